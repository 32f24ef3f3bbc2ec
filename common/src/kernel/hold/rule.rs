//! A hold's rule: `ip daddr <container> queue num <queue>`, in the table of its own,
//! written over netlink because it needs the compat `NFQUEUE` target (see the module above).

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
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
};

use crate::kernel::nfnetlink::{self, errno_of, Errno};

/// The hold's table (family `ip`).
const TABLE: &str = "live_migrate_hold";
/// Its base chain.
const CHAIN: &str = "prerouting";
/// After `dstnat` (-100), before `filter` (0).
const CHAIN_PRIORITY: i32 = -50;
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
pub(super) async fn install_rule(
    ip: Ipv4Addr,
    queue: u16,
    except_from: Option<&str>,
) -> Result<u64> {
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
pub(super) async fn remove_rules(ip: Ipv4Addr) -> Result<()> {
    for handle in rule_handles(ip).await? {
        remove_rule(ip, handle).await?;
    }
    Ok(())
}

/// Removes one hold rule (gone already is fine).
pub(super) async fn remove_rule(ip: Ipv4Addr, handle: u64) -> Result<()> {
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
