//! Links, addresses, routes and policy rules of the current network namespace, spoken to the
//! kernel over rtnetlink (no `ip` command involved).
//!
//! A [`Routing`] wraps one rtnetlink connection. Its netlink socket is opened in the network
//! namespace of the thread that calls [`Routing::new`] and stays bound to that namespace for
//! its whole life, whichever thread later drives it.
//!
//! # What the agent owns
//!
//! The agent only ever creates routes in the tables [`AGENT_TABLE_MIN`]`..=`[`AGENT_TABLE_MAX`]
//! and policy rules with priorities [`AGENT_RULE_PRIORITY_MIN`]`..=`[`AGENT_RULE_PRIORITY_MAX`].
//! Everything else in the namespace (the main table, the default rules, other programs'
//! routes) is left alone; [`Routing::replace_route`] and [`Routing::add_fwmark_rule`] refuse
//! table numbers / priorities outside these ranges so a typo cannot rewrite the main table.
//!
//! # Idempotence
//!
//! * [`Routing::add_address`] and [`Routing::add_fwmark_rule`] succeed when the exact object
//!   already exists (`EEXIST`).
//! * [`Routing::replace_route`] uses `NLM_F_CREATE | NLM_F_REPLACE`, so switching a `/32`
//!   from a blackhole to a device route is one atomic kernel operation (no window without a
//!   route).
//! * [`Routing::delete_route`] / [`Routing::delete_fwmark_rule`] return `Ok(false)` when there
//!   was nothing to delete (`ENOENT` / `ESRCH`).

mod messages;
mod types;

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::TryStreamExt;
use nix::errno::Errno;
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        link::LinkMessage,
        route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
        AddressFamily,
    },
    Handle, IpVersion, LinkUnspec, RouteMessageBuilder,
};

use messages::{
    base_route_message, link_state, route_from_message, route_table, rule_entry, set_rule_table,
};
pub use types::{LinkState, Route, RouteKind, RuleEntry};

/// First routing table number reserved for the agent.
pub const AGENT_TABLE_MIN: u32 = 7800;
/// Last routing table number reserved for the agent.
pub const AGENT_TABLE_MAX: u32 = 7899;
/// The tables the agent owns.
pub const AGENT_TABLES: RangeInclusive<u32> = AGENT_TABLE_MIN..=AGENT_TABLE_MAX;
/// Lowest policy-rule priority the agent uses (lower number = evaluated earlier; the kernel's
/// default rules sit at 0, 32766 and 32767).
pub const AGENT_RULE_PRIORITY_MIN: u32 = 7800;
/// Highest policy-rule priority the agent uses.
pub const AGENT_RULE_PRIORITY_MAX: u32 = 7899;
/// The rule priorities the agent owns.
pub const AGENT_RULE_PRIORITIES: RangeInclusive<u32> =
    AGENT_RULE_PRIORITY_MIN..=AGENT_RULE_PRIORITY_MAX;

/// The errno carried by a netlink error reply, if the error is one.
pub fn netlink_errno(err: &rtnetlink::Error) -> Option<Errno> {
    raw_errno(err).map(Errno::from_raw)
}

/// The positive errno number of a netlink error reply (kept for messages: nix names only
/// the numbers it knows).
fn raw_errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => {
            let code = msg.raw_code().abs();
            (code != 0).then_some(code)
        }
        _ => None,
    }
}

/// Turn an rtnetlink error into an `anyhow` error naming the operation and the errno.
fn nl_error(err: rtnetlink::Error, what: impl fmt::Display) -> anyhow::Error {
    match raw_errno(&err) {
        Some(code) => {
            let errno = Errno::from_raw(code);
            anyhow!("{what}: {errno:?} ({}, errno {code})", errno.desc())
        }
        None => anyhow!("{what}: {err}"),
    }
}

fn max_prefix(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn check_prefix(addr: &IpAddr, prefix: u8) -> Result<()> {
    if prefix > max_prefix(addr) {
        bail!("invalid prefix length /{prefix} for {addr}");
    }
    Ok(())
}

/// Handle on the rtnetlink socket of the network namespace it was created in.
#[derive(Clone, Debug)]
pub struct Routing {
    handle: Handle,
}

impl Routing {
    /// Open an rtnetlink connection in the calling thread's network namespace and spawn its
    /// connection task on the current tokio runtime.
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Handle::try_current()
            .context("Routing::new must be called inside a tokio runtime")?;
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening rtnetlink socket")?;
        rt.spawn(connection);
        Ok(Routing { handle })
    }

    /// The underlying rtnetlink handle, for operations not wrapped here.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    // ----------------------------------------------------------------------------- links

    /// The link called `name`, or `None` if there is none.
    pub async fn link(&self, name: &str) -> Result<Option<LinkState>> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_state(&msg))),
            Ok(None) => Ok(None),
            Err(e) if matches!(netlink_errno(&e), Some(Errno::ENODEV)) => Ok(None),
            Err(e) => Err(nl_error(e, format_args!("looking up link {name}"))),
        }
    }

    /// All links of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkState>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error(e, "listing links"))?;
        Ok(msgs.iter().map(link_state).collect())
    }

    /// Interface index of `name`, `None` if the link does not exist.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link(name).await?.map(|l| l.index))
    }

    async fn require_index(&self, name: &str) -> Result<u32> {
        self.link_index(name)
            .await?
            .ok_or_else(|| anyhow!("link {name} does not exist"))
    }

    /// Set `name` administratively up.
    pub async fn set_link_up(&self, name: &str) -> Result<()> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| nl_error(e, format_args!("setting link {name} up")))
    }

    /// Set the MTU and the transmit queue length of `name` and bring it up, in one request.
    pub async fn configure_link_up(&self, name: &str, mtu: u32, txqueuelen: u32) -> Result<()> {
        let index = self.require_index(name).await?;
        let link = LinkUnspec::new_with_index(index)
            .mtu(mtu)
            .txqueuelen(txqueuelen)
            .up()
            .build();
        self.handle.link().set(link).execute().await.map_err(|e| {
            nl_error(
                e,
                format_args!("setting link {name} mtu {mtu} txqueuelen {txqueuelen} up"),
            )
        })
    }

    /// Delete link `name`. `Ok(false)` if it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(netlink_errno(&e), Some(Errno::ENODEV)) => Ok(false),
            Err(e) => Err(nl_error(e, format_args!("deleting link {name}"))),
        }
    }

    // ------------------------------------------------------------------------- addresses

    /// Add `addr/prefix` to `link`. Succeeds if the address is already there.
    pub async fn add_address(&self, link: &str, addr: IpAddr, prefix: u8) -> Result<()> {
        check_prefix(&addr, prefix)?;
        let index = self
            .require_index(link)
            .await
            .with_context(|| format!("adding address {addr}/{prefix}"))?;
        match self
            .handle
            .address()
            .add(index, addr, prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(netlink_errno(&e), Some(Errno::EEXIST)) => Ok(()),
            Err(e) => Err(nl_error(
                e,
                format_args!("adding address {addr}/{prefix} to {link}"),
            )),
        }
    }

    /// Addresses on `link` (empty if the link does not exist).
    pub async fn addresses(&self, link: &str) -> Result<Vec<(IpAddr, u8)>> {
        let Some(index) = self.link_index(link).await? else {
            return Ok(Vec::new());
        };
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error(e, format_args!("listing addresses of {link}")))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                // IFA_LOCAL is the interface's own address on point-to-point links;
                // IFA_ADDRESS is the peer there. Prefer IFA_LOCAL.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let address = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                local.or(address).map(|ip| (ip, m.header.prefix_len))
            })
            .collect())
    }

    // ---------------------------------------------------------------------------- routes

    /// Create or atomically replace the route to `route.dst/route.prefix` in `route.table`
    /// (`NLM_F_CREATE | NLM_F_REPLACE`, like `ip route replace`). The table must be one of
    /// the agent's ([`AGENT_TABLES`]) or the main table (254), which the agent uses for
    /// blackholing a migrating container's address.
    pub async fn replace_route(&self, route: &Route) -> Result<()> {
        check_prefix(&route.dst, route.prefix)?;
        check_route_table(route.table)?;
        let mut msg = base_route_message(route.dst, route.prefix, route.table);
        msg.header.protocol = RouteProtocol::Static;
        match &route.kind {
            RouteKind::Device(dev) => {
                let index = self
                    .require_index(dev)
                    .await
                    .with_context(|| format!("replacing route {route}"))?;
                msg.header.kind = RouteType::Unicast;
                msg.header.scope = RouteScope::Link;
                msg.attributes.push(RouteAttribute::Oif(index));
            }
            RouteKind::Blackhole => {
                msg.header.kind = RouteType::BlackHole;
                msg.header.scope = RouteScope::Universe;
            }
            RouteKind::Other(desc) => bail!("cannot create a route of kind {desc:?}"),
        }
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_error(e, format_args!("replacing route {route}")))
    }

    /// Delete the route to `dst/prefix` in `table`, whatever its kind. `Ok(false)` if there
    /// was none.
    pub async fn delete_route(&self, dst: IpAddr, prefix: u8, table: u32) -> Result<bool> {
        check_prefix(&dst, prefix)?;
        let mut msg = base_route_message(dst, prefix, table);
        // Wildcards so any route type / protocol / scope matches.
        msg.header.kind = RouteType::Unspec;
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(netlink_errno(&e), Some(Errno::ENOENT | Errno::ESRCH)) => Ok(false),
            Err(e) => Err(nl_error(
                e,
                format_args!("deleting route {dst}/{prefix} table {table}"),
            )),
        }
    }

    /// All IPv4 and IPv6 routes of `table`.
    pub async fn routes_in_table(&self, table: u32) -> Result<Vec<Route>> {
        let names: HashMap<u32, String> = self
            .links()
            .await?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let mut out = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let query = match version {
                IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(table)
                    .build(),
                IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                    .table_id(table)
                    .build(),
            };
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_error(e, format_args!("listing routes of table {table}")))?;
            out.extend(
                msgs.iter()
                    .filter(|m| route_table(m) == table)
                    .filter_map(|m| route_from_message(m, &names)),
            );
        }
        Ok(out)
    }

    // ----------------------------------------------------------------------------- rules

    /// Add the IPv4 rule `priority: fwmark mark/mask lookup table`. Succeeds if this exact
    /// rule already exists.
    pub async fn add_fwmark_rule(
        &self,
        mark: u32,
        mask: u32,
        table: u32,
        priority: u32,
    ) -> Result<()> {
        let what = || format!("adding rule {priority}: fwmark {mark:#x}/{mask:#x} lookup {table}");
        check_rule(table, priority).with_context(what)?;
        let mut req = self
            .handle
            .rule()
            .add()
            .v4()
            .action(RuleAction::ToTable)
            .priority(priority)
            .fw_mark(mark);
        let msg = req.message_mut();
        msg.attributes.push(RuleAttribute::FwMask(mask));
        set_rule_table(msg, table);
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(netlink_errno(&e), Some(Errno::EEXIST)) => Ok(()),
            Err(e) => Err(nl_error(e, what())),
        }
    }

    /// Delete the rule made by [`Self::add_fwmark_rule`] with the same arguments. `Ok(false)`
    /// if it did not exist.
    pub async fn delete_fwmark_rule(
        &self,
        mark: u32,
        mask: u32,
        table: u32,
        priority: u32,
    ) -> Result<bool> {
        let mut msg = RuleMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.action = RuleAction::ToTable;
        msg.attributes.push(RuleAttribute::Priority(priority));
        msg.attributes.push(RuleAttribute::FwMark(mark));
        msg.attributes.push(RuleAttribute::FwMask(mask));
        set_rule_table(&mut msg, table);
        match self.handle.rule().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(netlink_errno(&e), Some(Errno::ENOENT | Errno::ESRCH)) => Ok(false),
            Err(e) => Err(nl_error(
                e,
                format_args!("deleting rule {priority}: fwmark {mark:#x}/{mask:#x} lookup {table}"),
            )),
        }
    }

    /// All IPv4 and IPv6 policy rules of the namespace.
    pub async fn rules(&self) -> Result<Vec<RuleEntry>> {
        let mut out = Vec::new();
        for (version, v) in [(IpVersion::V4, 4u8), (IpVersion::V6, 6u8)] {
            let msgs: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_error(e, format_args!("listing IPv{v} rules")))?;
            out.extend(msgs.iter().map(|m| rule_entry(m, v)));
        }
        Ok(out)
    }

    /// The rules in the agent's priority range ([`AGENT_RULE_PRIORITIES`]).
    pub async fn agent_rules(&self) -> Result<Vec<RuleEntry>> {
        Ok(self
            .rules()
            .await?
            .into_iter()
            .filter(|r| AGENT_RULE_PRIORITIES.contains(&r.priority))
            .collect())
    }
}

fn check_route_table(table: u32) -> Result<()> {
    if AGENT_TABLES.contains(&table) || table == u32::from(RouteHeader::RT_TABLE_MAIN) {
        Ok(())
    } else {
        bail!(
            "route table {table} is not the agent's (allowed: {AGENT_TABLE_MIN}-{AGENT_TABLE_MAX} or main)"
        )
    }
}

fn check_rule(table: u32, priority: u32) -> Result<()> {
    if !AGENT_RULE_PRIORITIES.contains(&priority) {
        bail!(
            "rule priority {priority} is outside the agent's range {AGENT_RULE_PRIORITY_MIN}-{AGENT_RULE_PRIORITY_MAX}"
        );
    }
    if !AGENT_TABLES.contains(&table) {
        bail!(
            "rule table {table} is outside the agent's range {AGENT_TABLE_MIN}-{AGENT_TABLE_MAX}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::messages::RT_TABLE_UNSPEC;
    use super::*;

    #[test]
    fn agent_ranges_are_sane() {
        const {
            assert!(
                AGENT_TABLE_MIN > 255,
                "agent tables must not collide with u8 ids"
            );
            assert!(
                AGENT_RULE_PRIORITY_MAX < 32766,
                "agent rules must come before main"
            );
        }
        assert!(check_rule(7800, 7800).is_ok());
        assert!(check_rule(254, 7800).is_err());
        assert!(check_rule(7800, 100).is_err());
        assert!(check_route_table(254).is_ok());
        assert!(check_route_table(255).is_err());
        assert!(check_route_table(7899).is_ok());
    }

    #[test]
    fn route_message_uses_table_attribute_for_large_tables() {
        let msg = base_route_message("10.1.2.3".parse().unwrap(), 32, 7801);
        assert_eq!(msg.header.table, RT_TABLE_UNSPEC);
        assert_eq!(route_table(&msg), 7801);
        let msg = base_route_message("10.1.2.3".parse().unwrap(), 32, 254);
        assert_eq!(route_table(&msg), 254);
    }

    #[test]
    fn prefix_checks() {
        assert!(check_prefix(&"10.0.0.1".parse().unwrap(), 32).is_ok());
        assert!(check_prefix(&"10.0.0.1".parse().unwrap(), 33).is_err());
        assert!(check_prefix(&"::1".parse().unwrap(), 128).is_ok());
    }
}
