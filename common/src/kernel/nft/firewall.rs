//! [`Firewall`]: the operations on the agent's table, each one atomic transaction.

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use nftables::{
    batch::Batch,
    expr::{Elem, Expression, NamedExpression},
    schema::{Element, NfListObject},
};

use super::names::*;
use super::rules::*;
use super::table::*;
use crate::kernel::conntrack::Proto;

/// Serialises read-modify-write sequences of this process on the table.
static LOCK: Mutex<()> = Mutex::new(());

/// Handle on the agent's table; [`Firewall::ensure`] creates it (idempotently).
#[derive(Debug, Clone)]
pub struct Firewall {
    _private: (),
}

impl Firewall {
    /// Creates table `inet live_migrate` and its base chains if missing (no-op otherwise).
    pub fn ensure() -> Result<Firewall> {
        let mut batch = Batch::new();
        add_skeleton(&mut batch);
        apply(batch.to_nftables()).context("creating nftables table inet live_migrate")?;
        Ok(Firewall { _private: () })
    }

    /// Marks connections entering through `ifname` with ct mark `mark` and restores that
    /// mark on their other packets, and drops returns that clash (see the `nft` module doc).
    /// Replaces an earlier mark of the same interface; no-op if already in place.
    pub fn mark_tunnel(&self, ifname: &str, mark: u32) -> Result<()> {
        check_ifname(ifname)?;
        if mark == 0 {
            bail!("mark 0 cannot tell marked connections apart");
        }
        self.replace(&[
            RuleKind::MarkTunnel {
                ifname: ifname.to_owned(),
                mark,
            },
            RuleKind::RestoreMark {
                ifname: ifname.to_owned(),
                mark,
            },
            RuleKind::DropClash {
                ifname: ifname.to_owned(),
            },
        ])
        .with_context(|| format!("marking connections from {ifname}"))
    }

    /// Removes the rules of `ifname` (no-op if none).
    pub fn unmark_tunnel(&self, ifname: &str) -> Result<()> {
        self.remove_where(|k| {
            matches!(k, RuleKind::MarkTunnel { ifname: i, .. }
                | RuleKind::RestoreMark { ifname: i, .. }
                | RuleKind::DropClash { ifname: i } if i == ifname)
        })
        .with_context(|| format!("unmarking {ifname}"))
    }

    /// Untracks the packets of `flows` (protocol, source, destination, as they arrive)
    /// that come through a tunnel, for `seconds` (see the `nft` module doc): they entered this
    /// host directly, and their container came back to it.
    pub fn untrack_returning(
        &self,
        flows: &[(Proto, SocketAddrV4, SocketAddrV4)],
        seconds: u32,
    ) -> Result<()> {
        if flows.is_empty() {
            return Ok(());
        }
        self.replace(&[RuleKind::UntrackReturning])?;
        let elements = flows
            .iter()
            .map(|(proto, from, to)| {
                Expression::Named(NamedExpression::Elem(Elem {
                    val: Box::new(Expression::Named(NamedExpression::Concat(vec![
                        string(proto.as_str()),
                        string(&from.ip().to_string()),
                        Expression::Number(u32::from(from.port())),
                        string(&to.ip().to_string()),
                        Expression::Number(u32::from(to.port())),
                    ]))),
                    timeout: Some(seconds),
                    expires: None,
                    comment: None,
                    counter: None,
                }))
            })
            .collect();
        let mut batch = Batch::new();
        batch.add(NfListObject::Element(Element {
            family: FAMILY,
            table: TABLE.into(),
            name: RETURNING_SET.into(),
            elem: Cow::Owned(elements),
        }));
        apply(batch.to_nftables()).context("untracking the packets of returning flows")
    }

    /// DNATs new connections to local port `host_port`/`proto` to `container_ip:container_port`.
    /// Replaces an earlier forward of the same port; no-op if already in place.
    pub fn forward_port(
        &self,
        proto: Proto,
        host_port: u16,
        container_ip: Ipv4Addr,
        container_port: u16,
    ) -> Result<()> {
        if host_port == 0 || container_port == 0 {
            bail!("port 0 cannot be forwarded");
        }
        self.replace(&[RuleKind::ForwardPort {
            proto,
            host_port,
            container: SocketAddrV4::new(container_ip, container_port),
        }])
        .with_context(|| format!("forwarding {proto} port {host_port}"))
    }

    /// Removes the forward of `host_port`/`proto` (no-op if none).
    pub fn unforward_port(&self, proto: Proto, host_port: u16) -> Result<()> {
        self.remove_where(|k| {
            matches!(k, RuleKind::ForwardPort { proto: p, host_port: h, .. }
                if *p == proto && *h == host_port)
        })
        .with_context(|| format!("removing the forward of {proto} port {host_port}"))
    }

    /// Lets only `peer` reach the TCP port `server` of this host (CRIU's page server,
    /// which serves the first connection it gets); replaces an earlier guard of it.
    pub fn guard_pages(&self, server: SocketAddrV4, peer: Ipv4Addr) -> Result<()> {
        self.replace(&[RuleKind::GuardPages { server, peer }])
            .with_context(|| format!("guarding the page server on {server}"))
    }

    /// Removes the guard of `server` (no-op if none).
    pub fn unguard_pages(&self, server: SocketAddrV4) -> Result<()> {
        self.remove_where(|k| matches!(k, RuleKind::GuardPages { server: s, .. } if *s == server))
            .with_context(|| format!("removing the guard of the page server on {server}"))
    }

    /// The rules of the agent's table (empty if the table does not exist).
    pub fn rules(&self) -> Result<Vec<InstalledRule>> {
        list_rules()
    }

    /// Deletes the agent's table and everything in it (no-op if it does not exist).
    pub fn remove_all(&self) -> Result<()> {
        remove_table()
    }

    /// Whether the agent's table exists in the current network namespace.
    pub fn table_exists() -> Result<bool> {
        table_listed()
    }

    /// Deletes the agent's table without a [`Firewall`] handle (cleanup paths).
    pub fn remove_table() -> Result<()> {
        remove_table()
    }

    /// Installs `wanted`, deleting rules with the same keys, in one transaction.
    fn replace(&self, wanted: &[RuleKind]) -> Result<()> {
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let current = list_rules()?;
        let stale: Vec<&InstalledRule> = current
            .iter()
            .filter(|r| wanted.iter().any(|w| w.same_key(&r.kind)))
            .collect();
        let in_place = stale.len() == wanted.len()
            && wanted
                .iter()
                .all(|w| stale.iter().any(|r| r.kind == *w && r.chain == w.chain()));
        if in_place {
            return Ok(());
        }
        apply(replace_batch(&stale, wanted)?)
    }

    fn remove_where(&self, pred: impl Fn(&RuleKind) -> bool) -> Result<()> {
        let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let doomed: Vec<InstalledRule> = list_rules()?
            .into_iter()
            .filter(|r| pred(&r.kind))
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new();
        for r in &doomed {
            batch.delete(NfListObject::Rule(handle_rule(r)));
        }
        apply(batch.to_nftables())
    }
}
