//! rtnetlink messages to and from the types of this module.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use rtnetlink::packet_route::{
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
    AddressFamily,
};

use super::types::{LinkState, Route, RouteKind, RuleEntry};

pub(super) const RT_TABLE_UNSPEC: u8 = 0;

pub(super) fn family_of(addr: &IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

pub(super) fn set_rule_table(msg: &mut RuleMessage, table: u32) {
    msg.attributes
        .retain(|a| !matches!(a, RuleAttribute::Table(_)));
    if table > 255 {
        msg.header.table = RT_TABLE_UNSPEC;
        msg.attributes.push(RuleAttribute::Table(table));
    } else {
        msg.header.table = table as u8;
    }
}

pub(super) fn base_route_message(dst: IpAddr, prefix: u8, table: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family_of(&dst);
    msg.header.destination_prefix_length = prefix;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    if table > 255 {
        msg.header.table = RT_TABLE_UNSPEC;
        msg.attributes.push(RouteAttribute::Table(table));
    } else {
        msg.header.table = table as u8;
    }
    msg
}

pub(super) fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

pub(super) fn route_from_message(
    msg: &RouteMessage,
    names: &HashMap<u32, String>,
) -> Option<Route> {
    let dst = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        })
        .or(match msg.header.address_family {
            // The default route carries no RTA_DST.
            AddressFamily::Inet => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            AddressFamily::Inet6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            _ => None,
        })?;
    let oif = msg.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let has_gateway = msg
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Via(_)));
    let kind = match (msg.header.kind, oif, has_gateway) {
        (RouteType::BlackHole, _, _) => RouteKind::Blackhole,
        (RouteType::Unicast, Some(i), false) => {
            RouteKind::Device(names.get(&i).cloned().unwrap_or_else(|| format!("if#{i}")))
        }
        (kind, oif, gw) => RouteKind::Other(format!(
            "{kind:?}{}{}",
            oif.map(|i| format!(" oif {}", names.get(&i).cloned().unwrap_or(i.to_string())))
                .unwrap_or_default(),
            if gw { " via gateway" } else { "" }
        )),
    };
    Some(Route {
        dst,
        prefix: msg.header.destination_prefix_length,
        table: route_table(msg),
        kind,
    })
}

pub(super) fn rule_entry(msg: &RuleMessage, ip_version: u8) -> RuleEntry {
    let mut entry = RuleEntry {
        ip_version,
        priority: 0,
        table: u32::from(msg.header.table),
        fwmark: None,
        fwmask: None,
        action: format!("{:?}", msg.header.action).to_lowercase(),
        other_selectors: msg.header.dst_len != 0 || msg.header.src_len != 0 || msg.header.tos != 0,
    };
    if msg.header.action == RuleAction::ToTable {
        entry.action = "to_table".to_string();
    }
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Priority(p) => entry.priority = *p,
            RuleAttribute::Table(t) => entry.table = *t,
            RuleAttribute::FwMark(m) => entry.fwmark = Some(*m),
            RuleAttribute::FwMask(m) => entry.fwmask = Some(*m),
            RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::Source(_)
            | RuleAttribute::Destination(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_)
            | RuleAttribute::UidRange(_) => entry.other_selectors = true,
            _ => {}
        }
    }
    entry
}

pub(super) fn link_state(msg: &LinkMessage) -> LinkState {
    let mut state = LinkState {
        index: msg.header.index,
        name: String::new(),
        mtu: None,
        txqueuelen: None,
        up: msg.header.flags.contains(LinkFlags::Up),
        kind: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => state.name = n.clone(),
            LinkAttribute::Mtu(m) => state.mtu = Some(*m),
            LinkAttribute::TxQueueLen(n) => state.txqueuelen = Some(*n),
            LinkAttribute::LinkInfo(infos) => {
                state.kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(InfoKind::Other(k)) => Some(k.clone()),
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    state
}
