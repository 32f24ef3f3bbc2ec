//! Connection-tracking entries of the current network namespace, read and written over
//! ctnetlink (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_CTNETLINK`) with the
//! `netlink-packet-netfilter` crate.
//!
//! A migration uses it to carry the conntrack state of a container's flows from the source
//! host to the destination: [`list`] + [`involving`] on the source, [`Flow`] is sent over
//! the wire (serde, defined in [`crate::protocol`]), [`create`] on the destination pre-creates the entries (ESTABLISHED,
//! ASSURED, with a mark telling the firewall that replies go back through the tunnel), and
//! [`delete`] / [`delete_marked`] undo that.
//!
//! Everything here acts on the network namespace of the thread that polls the future (the
//! netlink socket is opened on first poll). Nothing ever sends a delete request without an
//! original tuple: ctnetlink treats such a request as "flush the whole table".
//!
//! Attribute coverage: the crate models every attribute used here (`CTA_TUPLE_ORIG/REPLY`,
//! `CTA_STATUS`, `CTA_TIMEOUT`, `CTA_MARK`, `CTA_PROTOINFO_TCP_STATE`,
//! `CTA_PROTOINFO_TCP_FLAGS_*`). Its `TCPFlags` struct is `#[non_exhaustive]` and has no
//! constructor, so the flags value is built with `TCPFlags::parse` over the two raw bytes
//! (`flags`, `mask`) of `struct nf_ct_tcp_flags`.
//!
//! NAT: [`create`] does not install NAT bindings (`CTA_NAT_*` are not sent). An entry whose
//! reply tuple is not the mirror of its original tuple is stored as given but no address
//! translation is applied to its packets. Use [`Flow::without_nat`] to get the view of a
//! flow as the container itself sees it, which is what a destination host needs.

use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_netfilter::{
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, Status, TCPFlags, Tuple as NlTuple,
    },
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};

use crate::kernel::nfnetlink::{self, errno_of, Errno};
// The flow types are wire types (a source sends its flows to the destination); this
// module's API speaks in them.
pub use crate::protocol::{Flow, Proto, Tuple, TCP_STATE_ESTABLISHED};

/// Timeout given to pre-created TCP entries, seconds (refreshed by traffic anyway).
pub const TCP_TIMEOUT_SECS: u32 = 3600;
/// Timeout given to pre-created UDP entries, seconds.
pub const UDP_TIMEOUT_SECS: u32 = 120;
/// `IP_CT_TCP_FLAG_BE_LIBERAL`: do not drop packets of the entry as out-of-window. Set on
/// pre-created TCP entries, whose window tracking has no sequence numbers to start from.
const IP_CT_TCP_FLAG_BE_LIBERAL: u8 = 0x08;

/// The netlink name of `proto`.
fn to_netlink(proto: Proto) -> Protocol {
    match proto {
        Proto::Tcp => Protocol::Tcp,
        Proto::Udp => Protocol::Udp,
    }
}

/// Entries of `flows` whose original source or reply source is `ip`: flows started by
/// the container (orig src) and flows towards it (reply src), including DNATed ones
/// whose original destination is a host port.
pub fn involving(flows: &[Flow], ip: impl Into<IpAddr>) -> Vec<Flow> {
    let ip = ip.into();
    flows.iter().filter(|f| f.involves(ip)).cloned().collect()
}

/// All IPv4 TCP and UDP conntrack entries of the current network namespace.
pub async fn list() -> Result<Vec<Flow>> {
    let replies = request(
        NetfilterProtoFamily::IPv4,
        ConntrackMessage::Get(vec![]),
        NLM_F_REQUEST | NLM_F_DUMP,
    )
    .await
    .context("dumping the conntrack table")?;
    Ok(replies
        .iter()
        .filter_map(|attrs| flow_from_attributes(attrs))
        .filter(|f| f.orig.src.is_ipv4())
        .collect())
}

/// Creates a conntrack entry for `flow`: status CONFIRMED|ASSURED|SEEN_REPLY, TCP state
/// ESTABLISHED (or `flow.tcp_state`) with liberal window tracking, timeout
/// `flow.timeout` but at least [`TCP_TIMEOUT_SECS`] / [`UDP_TIMEOUT_SECS`], ct mark
/// `flow.mark`.
///
/// Returns whether this call made the entry: `false` if one with the same tuples existed
/// already (EEXIST). Such an entry is not ours (its mark, state and timeout are left as
/// they are), so an undo must not delete it.
pub async fn create(flow: &Flow) -> Result<bool> {
    let msg = ConntrackMessage::New(create_attributes(flow)?);
    match request(
        family_of(flow)?,
        msg,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )
    .await
    {
        Ok(_) => Ok(true),
        Err(e) if errno_of(&e) == Some(Errno::EEXIST) => Ok(false),
        Err(e) => Err(e.context(format!("creating conntrack entry {flow}"))),
    }
}

/// Deletes the entry whose original tuple is `flow.orig` (ENOENT is success).
pub async fn delete(flow: &Flow) -> Result<()> {
    let msg = ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple_attrs(
        flow.proto, &flow.orig,
    )?)]);
    match request(family_of(flow)?, msg, NLM_F_REQUEST | NLM_F_ACK).await {
        Ok(_) => Ok(()),
        Err(e) if errno_of(&e) == Some(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.context(format!("deleting conntrack entry {flow}"))),
    }
}

/// Deletes every IPv4 TCP/UDP entry with ct mark `mark`; returns how many were matched.
/// `mark` 0 is refused (it would mean "every unmarked entry").
///
/// Done as dump + delete-by-tuple rather than with a kernel-side filtered flush, so that
/// a kernel ignoring the filter can never turn it into a flush of the whole table.
pub async fn delete_marked(mark: u32) -> Result<usize> {
    if mark == 0 {
        bail!("refusing to delete conntrack entries with mark 0 (that is every unmarked entry)");
    }
    let marked: Vec<Flow> = list()
        .await?
        .into_iter()
        .filter(|f| f.mark == mark)
        .collect();
    for flow in &marked {
        delete(flow).await?;
    }
    Ok(marked.len())
}

fn family_of(flow: &Flow) -> Result<NetfilterProtoFamily> {
    let addrs = [flow.orig.src, flow.orig.dst, flow.reply.src, flow.reply.dst];
    if addrs.iter().all(|a| a.is_ipv4()) {
        Ok(NetfilterProtoFamily::IPv4)
    } else if addrs.iter().all(|a| a.is_ipv6()) {
        Ok(NetfilterProtoFamily::IPv6)
    } else {
        bail!("flow {flow} mixes IPv4 and IPv6 addresses")
    }
}

fn tuple_attrs(proto: Proto, t: &Tuple) -> Result<Vec<NlTuple>> {
    Ok(vec![
        NlTuple::Ip(vec![
            IPTuple::SourceAddress(t.src.ip()),
            IPTuple::DestinationAddress(t.dst.ip()),
        ]),
        NlTuple::Proto(vec![
            ProtoTuple::Protocol(to_netlink(proto)),
            ProtoTuple::SourcePort(t.src.port()),
            ProtoTuple::DestinationPort(t.dst.port()),
        ]),
    ])
}

/// Attributes of the IPCTNL_MSG_CT_NEW request that creates `flow`.
fn create_attributes(flow: &Flow) -> Result<Vec<ConntrackAttribute>> {
    let status = Status::Confirmed | Status::Assured | Status::SeenReply;
    let default = match flow.proto {
        Proto::Tcp => TCP_TIMEOUT_SECS,
        Proto::Udp => UDP_TIMEOUT_SECS,
    };
    // A dumped flow carries its *remaining* time, which may be about to run out.
    let timeout = flow.timeout.unwrap_or(default).max(default);
    let mut attrs = vec![
        ConntrackAttribute::CtaTupleOrig(tuple_attrs(flow.proto, &flow.orig)?),
        ConntrackAttribute::CtaTupleReply(tuple_attrs(flow.proto, &flow.reply)?),
        ConntrackAttribute::CtaStatus(status),
        ConntrackAttribute::CtaTimeout(timeout),
        ConntrackAttribute::CtaMark(flow.mark),
    ];
    if flow.proto == Proto::Tcp {
        // struct nf_ct_tcp_flags { u8 flags; u8 mask; }
        let liberal = [IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL];
        let flags = TCPFlags::parse(&liberal).map_err(|e| anyhow!("{e}"))?;
        attrs.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(
            vec![
                ProtoInfoTCP::State(flow.tcp_state.unwrap_or(TCP_STATE_ESTABLISHED)),
                ProtoInfoTCP::OriginalFlags(flags.clone()),
                ProtoInfoTCP::ReplyFlags(flags),
            ],
        )]));
    }
    Ok(attrs)
}

fn parse_tuple(tuples: &[NlTuple]) -> Option<(Protocol, Tuple)> {
    let (mut src_ip, mut dst_ip, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for t in tuples {
        match t {
            NlTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src_ip = Some(*a),
                        IPTuple::DestinationAddress(a) => dst_ip = Some(*a),
                        _ => {}
                    }
                }
            }
            NlTuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(x) => proto = Some(*x),
                        ProtoTuple::SourcePort(x) => sport = Some(*x),
                        ProtoTuple::DestinationPort(x) => dport = Some(*x),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        proto?,
        Tuple::new(
            SocketAddr::new(src_ip?, sport?),
            SocketAddr::new(dst_ip?, dport?),
        ),
    ))
}

/// A [`Flow`] from the attributes of a dumped entry; `None` for other protocols or
/// entries lacking a tuple.
fn flow_from_attributes(attrs: &[ConntrackAttribute]) -> Option<Flow> {
    let (mut orig, mut reply, mut mark, mut tcp_state, mut timeout) = (None, None, 0, None, None);
    for attr in attrs {
        match attr {
            ConntrackAttribute::CtaTupleOrig(t) => orig = parse_tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = parse_tuple(t),
            ConntrackAttribute::CtaMark(m) => mark = *m,
            ConntrackAttribute::CtaTimeout(t) => timeout = Some(*t),
            ConntrackAttribute::CtaProtoInfo(infos) => {
                for info in infos {
                    if let ProtoInfo::TCP(tcp) = info {
                        for item in tcp {
                            if let ProtoInfoTCP::State(s) = item {
                                tcp_state = Some(*s);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let (proto, orig) = orig?;
    let (_, reply) = reply?;
    let proto = match proto {
        Protocol::Tcp => Proto::Tcp,
        Protocol::Udp => Proto::Udp,
        _ => return None,
    };
    Some(Flow {
        proto,
        orig,
        reply,
        mark,
        tcp_state: if proto == Proto::Tcp { tcp_state } else { None },
        timeout,
    })
}

/// Sends one ctnetlink request and collects the attributes of every conntrack message of
/// the answer.
async fn request(
    family: NetfilterProtoFamily,
    msg: ConntrackMessage,
    flags: u16,
) -> Result<Vec<Vec<ConntrackAttribute>>> {
    let message = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), msg);
    Ok(nfnetlink::request(vec![(message, flags)])
        .await?
        .into_iter()
        .filter_map(|reply| match reply.inner {
            NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) => Some(attrs),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn involving_matches_orig_and_reply_sources() {
        let ctr: IpAddr = "10.88.0.5".parse().unwrap();
        // Client -> host port 8080, DNATed to the container.
        let dnat = Flow {
            proto: Proto::Tcp,
            orig: Tuple::new(sa("192.168.1.9:40000"), sa("192.168.1.2:8080")),
            reply: Tuple::new(sa("10.88.0.5:80"), sa("192.168.1.9:40000")),
            mark: 0,
            tcp_state: Some(3),
            timeout: Some(100),
        };
        // Container -> outside, masqueraded.
        let snat = Flow {
            proto: Proto::Udp,
            orig: Tuple::new(sa("10.88.0.5:5353"), sa("1.1.1.1:53")),
            reply: Tuple::new(sa("1.1.1.1:53"), sa("192.168.1.2:5353")),
            mark: 0,
            tcp_state: None,
            timeout: Some(20),
        };
        let other = Flow::tcp(sa("10.88.0.6:1000"), sa("10.88.0.7:80"));
        // Container IP only as orig destination (no NAT): reply src is the container.
        let direct = Flow::tcp(sa("10.88.0.9:1000"), sa("10.88.0.5:22"));
        let flows = vec![dnat.clone(), snat.clone(), other, direct.clone()];
        assert_eq!(involving(&flows, ctr), vec![dnat, snat, direct]);
        let v4: std::net::Ipv4Addr = "10.88.0.6".parse().unwrap();
        assert_eq!(involving(&flows, v4).len(), 1);
        assert!(involving(&flows, "10.99.0.1".parse::<IpAddr>().unwrap()).is_empty());
    }

    #[test]
    fn create_attributes_round_trip_through_the_parser() {
        let f = Flow::tcp(sa("10.1.1.1:1234"), sa("10.2.2.2:80")).with_mark(0x7801);
        let attrs = create_attributes(&f).unwrap();
        assert!(attrs.contains(&ConntrackAttribute::CtaTimeout(TCP_TIMEOUT_SECS)));
        assert!(attrs.contains(&ConntrackAttribute::CtaMark(0x7801)));
        let parsed = flow_from_attributes(&attrs).unwrap();
        assert_eq!(parsed.orig, f.orig);
        assert_eq!(parsed.reply, f.reply);
        assert_eq!(parsed.mark, 0x7801);
        assert_eq!(parsed.tcp_state, Some(TCP_STATE_ESTABLISHED));

        // A dumped flow about to expire gets the long default, a longer one keeps its own.
        let mut short = f.clone();
        short.timeout = Some(5);
        assert!(create_attributes(&short)
            .unwrap()
            .contains(&ConntrackAttribute::CtaTimeout(TCP_TIMEOUT_SECS)));
        short.timeout = Some(7200);
        assert!(create_attributes(&short)
            .unwrap()
            .contains(&ConntrackAttribute::CtaTimeout(7200)));

        let u = Flow::udp(sa("10.1.1.1:53"), sa("10.2.2.2:53"));
        let attrs = create_attributes(&u).unwrap();
        assert!(attrs.contains(&ConntrackAttribute::CtaTimeout(UDP_TIMEOUT_SECS)));
        assert!(!attrs
            .iter()
            .any(|a| matches!(a, ConntrackAttribute::CtaProtoInfo(_))));
    }

    #[test]
    fn create_message_serializes() {
        // The full netlink message must serialize and parse back (catches length bugs
        // in nested attributes).
        let f = Flow::tcp(sa("10.1.1.1:1234"), sa("10.2.2.2:80")).with_mark(0x7801);
        let mut packet = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                ConntrackMessage::New(create_attributes(&f).unwrap()),
            )),
        );
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        let back = NetlinkMessage::<NetfilterMessage>::deserialize(&buf).unwrap();
        match back.payload {
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                ..
            }) => assert_eq!(flow_from_attributes(&attrs).unwrap().orig, f.orig),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn mixed_families_are_rejected() {
        let mut f = Flow::tcp(sa("10.1.1.1:1"), sa("10.2.2.2:2"));
        f.reply.src = sa("[::1]:2");
        assert!(family_of(&f).is_err());
        let v6 = Flow::tcp(sa("[fd00::1]:1"), sa("[fd00::2]:2"));
        assert_eq!(family_of(&v6).unwrap(), NetfilterProtoFamily::IPv6);
    }
}
