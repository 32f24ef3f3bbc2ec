//! The agent's own nftables table, `inet live_migrate`, driven through the `nftables`
//! crate (JSON batches fed to the `nft` binary, one atomic transaction per call).
//!
//! The agent never touches any other table (podman/netavark keep theirs) and never
//! flushes the ruleset. Two base chains:
//!
//! * `prerouting` — `type filter hook prerouting priority mangle (-150)`. For each tunnel
//!   registered with [`Firewall::mark_tunnel`] it holds two rules:
//!   - `iifname "<tun>" ct state new ct mark set <mark>`: connections entering through the
//!     tunnel are marked;
//!   - `iifname != "<tun>" ct mark <mark> meta mark set ct mark`: the other packets of
//!     those connections (the container's replies, and the packets of pre-created
//!     conntrack entries carrying the same mark) get the packet mark, so that an
//!     `ip rule fwmark <mark>` sends them back through the tunnel.
//!
//!   The restore rule is per tunnel and excludes packets arriving *from* the tunnel on
//!   purpose: a generic `ct mark != 0 meta mark set ct mark` would also mark the inbound
//!   packets, and the fwmark rule would route them straight back into the tunnel.
//! * `postrouting` — `type filter hook postrouting priority srcnat + 10 (110)`: per tunnel,
//!   `iifname "<tun>" ct state new ct status snat drop`. A packet of a flow that entered
//!   this host directly, and comes back through a tunnel (the container returned to a
//!   former host while packets for it were held or on their way through other hosts),
//!   matches no connection here: its own connection here is the DNATed one. As a new
//!   connection its reply tuple clashes with that one, so NAT gives it another source
//!   port, and the container would answer the unknown port with a reset that kills the
//!   client's connection. Such a packet is dropped instead; the client sends it again on
//!   its direct path. Connections that legitimately enter through the tunnel get no
//!   source NAT here (netavark masquerades only what the containers send out).
//! * `raw_prerouting` — `type filter hook prerouting priority raw (-300)`:
//!   `iifname "lmwg-*" meta l4proto . ip saddr . th sport . ip daddr . th dport
//!   @returning_flows notrack`. The set holds, until shortly after its restore, the flows
//!   of a container that came back to a host where they entered directly (their own
//!   connection is here). Their packets held elsewhere arrive through the tunnel right
//!   after the restore; untracked, they are not mistaken for new connections (see
//!   `postrouting` above) and reach the container unchanged, and its answers still find
//!   the flow's own connection here. Only those flows: a new connection that comes through
//!   the tunnel meanwhile is tracked (and marked) as usual.
//! * `nat_prerouting` — `type nat hook prerouting priority dstnat - 10 (-110)`, i.e. before
//!   netavark's DNAT: [`Firewall::forward_port`] installs
//!   `meta nfproto ipv4 fib daddr type local <proto> dport <port> dnat ip to <ctr>:<port>`
//!   so new connections to a published port of this (old) host reach the migrated
//!   container wherever it is routed. Only locally addressed packets are caught, and as a
//!   nat chain it only sees the first packet of a connection.
//!
//! Every rule carries a comment `lm:<kind> <key=value...>` that identifies it; rules are
//! found by comment and deleted by handle, which makes every operation idempotent.
//! [`Firewall::rules`] decodes the comments into [`RuleKind`].
//!
//! All calls are blocking (they spawn `nft`) and act on the network namespace of the
//! calling thread. From async code use `tokio::task::spawn_blocking`.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use nftables::{
    batch::Batch,
    expr::{
        Elem, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload,
        PayloadField, CT,
    },
    helper::{self, NftablesError},
    schema::{
        Chain, Element, NfListObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue, Table,
    },
    stmt::{Mangle, Match, NATFamily, Operator, Statement, NAT},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use serde::{Deserialize, Serialize};

use crate::kernel::conntrack::Proto;

/// Name of the agent's table (family `inet`).
pub const TABLE: &str = "live_migrate";
/// Family of the agent's table.
pub const FAMILY: NfFamily = NfFamily::INet;
/// Filter chain at prerouting/mangle: connection marks.
pub const PREROUTING_CHAIN: &str = "prerouting";
/// NAT chain at prerouting, before netavark's: port forwards to migrated containers.
pub const NAT_PREROUTING_CHAIN: &str = "nat_prerouting";
/// Filter chain at postrouting, after source NAT: drops clashing returns.
pub const POSTROUTING_CHAIN: &str = "postrouting";
/// Filter chain at prerouting, before conntrack: untracks returning packets.
pub const RAW_PREROUTING_CHAIN: &str = "raw_prerouting";
/// Flows whose returning packets are untracked, with a timeout.
pub const RETURNING_SET: &str = "returning_flows";
/// Priority of [`PREROUTING_CHAIN`] (`mangle`).
pub const PREROUTING_PRIORITY: i32 = -150;
/// Priority of [`NAT_PREROUTING_CHAIN`] (`dstnat - 10`).
pub const NAT_PREROUTING_PRIORITY: i32 = -110;
/// Priority of [`POSTROUTING_CHAIN`] (`srcnat + 10`).
pub const POSTROUTING_PRIORITY: i32 = 110;
/// Priority of [`RAW_PREROUTING_CHAIN`] (`raw`).
pub const RAW_PREROUTING_PRIORITY: i32 = -300;

const COMMENT_PREFIX: &str = "lm:";

/// Serialises read-modify-write sequences of this process on the table.
static LOCK: Mutex<()> = Mutex::new(());

/// What a rule of the agent's table is for (decoded from its comment).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RuleKind {
    /// `iifname <ifname> ct state new ct mark set <mark>` (chain `prerouting`).
    MarkTunnel { ifname: String, mark: u32 },
    /// `iifname != <ifname> ct mark <mark> meta mark set ct mark` (chain `prerouting`).
    RestoreMark { ifname: String, mark: u32 },
    /// `iifname <ifname> ct state new ct status snat drop` (chain `postrouting`).
    DropClash { ifname: String },
    /// `iifname "lmwg-*" meta l4proto . ip saddr . th sport . ip daddr . th dport
    /// @returning_flows notrack` (chain `raw_prerouting`).
    UntrackReturning,
    /// `... <proto> dport <host_port> dnat ip to <container>` (chain `nat_prerouting`).
    ForwardPort {
        proto: Proto,
        host_port: u16,
        container: SocketAddrV4,
    },
    /// A rule of the table whose comment is not one of ours (never created by the agent).
    Unknown { comment: Option<String> },
}

impl RuleKind {
    /// The comment stored on the rule; [`RuleKind::from_comment`] is its inverse.
    pub fn comment(&self) -> String {
        match self {
            RuleKind::MarkTunnel { ifname, mark } => {
                format!("{COMMENT_PREFIX}mark-tunnel if={ifname} mark={mark:#x}")
            }
            RuleKind::RestoreMark { ifname, mark } => {
                format!("{COMMENT_PREFIX}restore-mark if={ifname} mark={mark:#x}")
            }
            RuleKind::DropClash { ifname } => format!("{COMMENT_PREFIX}drop-clash if={ifname}"),
            RuleKind::UntrackReturning => format!("{COMMENT_PREFIX}untrack-returning"),
            RuleKind::ForwardPort {
                proto,
                host_port,
                container,
            } => format!("{COMMENT_PREFIX}forward {proto} port={host_port} to={container}"),
            RuleKind::Unknown { comment } => comment.clone().unwrap_or_default(),
        }
    }

    /// Decodes a comment written by [`RuleKind::comment`]; anything else is `Unknown`.
    pub fn from_comment(comment: Option<&str>) -> RuleKind {
        comment
            .and_then(parse_comment)
            .unwrap_or_else(|| RuleKind::Unknown {
                comment: comment.map(str::to_owned),
            })
    }

    /// Chain holding this kind of rule.
    pub fn chain(&self) -> &'static str {
        match self {
            RuleKind::ForwardPort { .. } => NAT_PREROUTING_CHAIN,
            RuleKind::DropClash { .. } => POSTROUTING_CHAIN,
            RuleKind::UntrackReturning => RAW_PREROUTING_CHAIN,
            _ => PREROUTING_CHAIN,
        }
    }

    /// The rule's statements (nftables JSON expressions).
    fn statements(&self) -> Result<Vec<Statement<'static>>> {
        Ok(match self {
            RuleKind::MarkTunnel { ifname, mark } => vec![
                matches(meta(MetaKey::Iifname), Operator::EQ, string(ifname)),
                matches(ct("state"), Operator::IN, string("new")),
                Statement::Mangle(Mangle {
                    key: ct("mark"),
                    value: Expression::Number(*mark),
                }),
            ],
            RuleKind::RestoreMark { ifname, mark } => vec![
                matches(meta(MetaKey::Iifname), Operator::NEQ, string(ifname)),
                matches(ct("mark"), Operator::EQ, Expression::Number(*mark)),
                Statement::Mangle(Mangle {
                    key: meta(MetaKey::Mark),
                    value: ct("mark"),
                }),
            ],
            RuleKind::DropClash { ifname } => vec![
                matches(meta(MetaKey::Iifname), Operator::EQ, string(ifname)),
                matches(ct("state"), Operator::IN, string("new")),
                matches(ct("status"), Operator::IN, string("snat")),
                Statement::Drop(None),
            ],
            RuleKind::UntrackReturning => vec![
                matches(
                    meta(MetaKey::Iifname),
                    Operator::EQ,
                    string(&format!("{}*", crate::kernel::wireguard::INTERFACE_PREFIX)),
                ),
                matches(
                    Expression::Named(NamedExpression::Concat(vec![
                        meta(MetaKey::L4proto),
                        payload("ip", "saddr"),
                        payload("th", "sport"),
                        payload("ip", "daddr"),
                        payload("th", "dport"),
                    ])),
                    Operator::EQ,
                    string(&format!("@{RETURNING_SET}")),
                ),
                Statement::Notrack,
            ],
            RuleKind::ForwardPort {
                proto,
                host_port,
                container,
            } => vec![
                matches(meta(MetaKey::Nfproto), Operator::EQ, string("ipv4")),
                matches(
                    Expression::Named(NamedExpression::Fib(Fib {
                        result: FibResult::Type,
                        flags: HashSet::from([FibFlag::Daddr]),
                    })),
                    Operator::EQ,
                    string("local"),
                ),
                matches(
                    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                        PayloadField {
                            protocol: proto.as_str().into(),
                            field: "dport".into(),
                        },
                    ))),
                    Operator::EQ,
                    Expression::Number(u32::from(*host_port)),
                ),
                Statement::DNAT(Some(NAT {
                    addr: Some(string(&container.ip().to_string())),
                    family: Some(NATFamily::IP),
                    port: Some(Expression::Number(u32::from(container.port()))),
                    flags: None,
                })),
            ],
            RuleKind::Unknown { .. } => bail!("cannot build an unknown rule"),
        })
    }

    /// Rules with the same key replace each other: one mark per tunnel, one forward per
    /// (protocol, host port).
    fn same_key(&self, other: &RuleKind) -> bool {
        match (self, other) {
            (RuleKind::MarkTunnel { ifname: a, .. }, RuleKind::MarkTunnel { ifname: b, .. })
            | (RuleKind::RestoreMark { ifname: a, .. }, RuleKind::RestoreMark { ifname: b, .. })
            | (RuleKind::DropClash { ifname: a }, RuleKind::DropClash { ifname: b }) => a == b,
            (RuleKind::UntrackReturning, RuleKind::UntrackReturning) => true,
            (
                RuleKind::ForwardPort {
                    proto: p1,
                    host_port: h1,
                    ..
                },
                RuleKind::ForwardPort {
                    proto: p2,
                    host_port: h2,
                    ..
                },
            ) => p1 == p2 && h1 == h2,
            _ => false,
        }
    }

    /// The `nft` rule object (without handle) that installs this rule.
    pub fn to_rule(&self) -> Result<Rule<'static>> {
        Ok(Rule {
            family: FAMILY,
            table: TABLE.into(),
            chain: self.chain().into(),
            expr: Cow::Owned(self.statements()?),
            handle: None,
            index: None,
            comment: Some(self.comment().into()),
        })
    }
}

fn parse_comment(c: &str) -> Option<RuleKind> {
    let rest = c.strip_prefix(COMMENT_PREFIX)?;
    let mut words = rest.split_whitespace();
    let kind = words.next()?;
    let field = |w: Option<&str>, key: &str| -> Option<String> {
        w?.strip_prefix(key)?.strip_prefix('=').map(str::to_owned)
    };
    let parse_mark = |s: String| -> Option<u32> {
        match s.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    };
    let kind = match kind {
        "mark-tunnel" | "restore-mark" => {
            let ifname = field(words.next(), "if")?;
            let mark = parse_mark(field(words.next(), "mark")?)?;
            if kind == "mark-tunnel" {
                RuleKind::MarkTunnel { ifname, mark }
            } else {
                RuleKind::RestoreMark { ifname, mark }
            }
        }
        "drop-clash" => RuleKind::DropClash {
            ifname: field(words.next(), "if")?,
        },
        "untrack-returning" => RuleKind::UntrackReturning,
        "forward" => RuleKind::ForwardPort {
            proto: words.next()?.parse().ok()?,
            host_port: field(words.next(), "port")?.parse().ok()?,
            container: field(words.next(), "to")?.parse().ok()?,
        },
        _ => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some(kind)
}

/// A rule found in the agent's table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledRule {
    pub chain: String,
    /// nftables rule handle (unique within the table).
    pub handle: u32,
    #[serde(flatten)]
    pub kind: RuleKind,
}

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
    /// mark on their other packets, and drops returns that clash (see the module doc).
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
    /// that come through a tunnel, for `seconds` (see the module doc): they entered this
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
        Ok(read_table()?.is_some())
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

/// The batch that deletes `stale` (by handle) and adds `wanted`, after making sure the
/// table and chains exist.
fn replace_batch(stale: &[&InstalledRule], wanted: &[RuleKind]) -> Result<Nftables<'static>> {
    let mut batch = Batch::new();
    add_skeleton(&mut batch);
    for r in stale {
        batch.delete(NfListObject::Rule(handle_rule(r)));
    }
    for w in wanted {
        batch.add(NfListObject::Rule(w.to_rule()?));
    }
    Ok(batch.to_nftables())
}

fn handle_rule(r: &InstalledRule) -> Rule<'static> {
    Rule {
        family: FAMILY,
        table: TABLE.into(),
        chain: r.chain.clone().into(),
        expr: Cow::Owned(vec![]),
        handle: Some(r.handle),
        index: None,
        comment: None,
    }
}

fn table() -> Table<'static> {
    Table {
        family: FAMILY,
        name: TABLE.into(),
        handle: None,
    }
}

fn base_chain(name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        family: FAMILY,
        table: TABLE.into(),
        name: name.into(),
        newname: None,
        handle: None,
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    }
}

/// `add table` / `add chain` (idempotent in nft).
fn add_skeleton(batch: &mut Batch<'static>) {
    batch.add(NfListObject::Table(table()));
    let chains = [
        (
            PREROUTING_CHAIN,
            NfChainType::Filter,
            NfHook::Prerouting,
            PREROUTING_PRIORITY,
        ),
        (
            NAT_PREROUTING_CHAIN,
            NfChainType::NAT,
            NfHook::Prerouting,
            NAT_PREROUTING_PRIORITY,
        ),
        (
            POSTROUTING_CHAIN,
            NfChainType::Filter,
            NfHook::Postrouting,
            POSTROUTING_PRIORITY,
        ),
        (
            RAW_PREROUTING_CHAIN,
            NfChainType::Filter,
            NfHook::Prerouting,
            RAW_PREROUTING_PRIORITY,
        ),
    ];
    for (name, kind, hook, priority) in chains {
        batch.add(NfListObject::Chain(base_chain(name, kind, hook, priority)));
    }
    batch.add(NfListObject::Set(Box::new(Set {
        family: FAMILY,
        table: TABLE.into(),
        name: RETURNING_SET.into(),
        handle: None,
        set_type: SetTypeValue::Concatenated(Cow::Borrowed(&[
            SetType::InetProto,
            SetType::Ipv4Addr,
            SetType::InetService,
            SetType::Ipv4Addr,
            SetType::InetService,
        ])),
        policy: None,
        flags: Some(HashSet::from([SetFlag::Timeout])),
        elem: None,
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    })));
}

fn remove_table() -> Result<()> {
    // `add` then `delete` in one transaction: deletes the table if present, and is not
    // an error if it is absent.
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table()));
    batch.delete(NfListObject::Table(table()));
    apply(batch.to_nftables()).context("deleting nftables table inet live_migrate")
}

fn apply(ruleset: Nftables<'_>) -> Result<()> {
    let mut json = serde_json::to_value(&ruleset)?;
    untangle_notrack(&mut json);
    helper::apply_ruleset_raw(&json.to_string(), helper::DEFAULT_NFT, helper::DEFAULT_ARGS)
        .map(drop)
        .map_err(nft_error)
}

/// The crate writes the `notrack` statement as a bare string, which nft rejects ("expected
/// object"); nft's schema has it as `{"notrack": null}`.
fn untangle_notrack(json: &mut serde_json::Value) {
    let commands = json.get_mut("nftables").and_then(|c| c.as_array_mut());
    for command in commands.into_iter().flatten() {
        // `get_mut`, not indexing: indexing a missing key inserts it.
        let statements = command
            .get_mut("add")
            .and_then(|c| c.get_mut("rule"))
            .and_then(|r| r.get_mut("expr"))
            .and_then(|e| e.as_array_mut());
        for statement in statements.into_iter().flatten() {
            if statement == "notrack" {
                *statement = serde_json::json!({ "notrack": null });
            }
        }
    }
}

fn nft_error(e: NftablesError) -> anyhow::Error {
    match e {
        NftablesError::NftFailed { hint, stderr, .. } => {
            anyhow::anyhow!("nft failed while {hint}: {}", stderr.trim())
        }
        other => other.into(),
    }
}

/// `nft -j list table inet live_migrate`, parsed as JSON; `None` if there is no table.
fn read_table() -> Result<Option<serde_json::Value>> {
    match helper::get_current_ruleset_raw(helper::DEFAULT_NFT, ["list", "table", "inet", TABLE]) {
        Ok(out) => Ok(Some(
            serde_json::from_str(&out).context("parsing the output of nft -j list table")?,
        )),
        Err(NftablesError::NftFailed { stderr, .. })
            if stderr.contains("No such file or directory") =>
        {
            Ok(None)
        }
        Err(e) => Err(nft_error(e)).context("listing nftables table inet live_migrate"),
    }
}

fn list_rules() -> Result<Vec<InstalledRule>> {
    Ok(read_table()?
        .map(|v| rules_from_json(&v))
        .unwrap_or_default())
}

/// The rules of our table in an `nft -j list` document. Only table, chain, handle and
/// comment are read, so expression syntax differences between nft versions do not matter.
fn rules_from_json(doc: &serde_json::Value) -> Vec<InstalledRule> {
    let Some(objects) = doc.get("nftables").and_then(|v| v.as_array()) else {
        return vec![];
    };
    objects
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| {
            r.get("family").and_then(|v| v.as_str()) == Some("inet")
                && r.get("table").and_then(|v| v.as_str()) == Some(TABLE)
        })
        .filter_map(|r| {
            Some(InstalledRule {
                chain: r.get("chain")?.as_str()?.to_owned(),
                handle: u32::try_from(r.get("handle")?.as_u64()?).ok()?,
                kind: RuleKind::from_comment(r.get("comment").and_then(|c| c.as_str())),
            })
        })
        .collect()
}

fn check_ifname(ifname: &str) -> Result<()> {
    let ok = !ifname.is_empty()
        && ifname.len() <= 15
        && ifname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if !ok {
        bail!("invalid interface name {ifname:?}");
    }
    Ok(())
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.to_string().into(),
            field: field.to_string().into(),
        },
    )))
}

fn string(s: &str) -> Expression<'static> {
    Expression::String(s.to_owned().into())
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kinds() -> Vec<RuleKind> {
        vec![
            RuleKind::MarkTunnel {
                ifname: "wg-lm0".into(),
                mark: 0x7801,
            },
            RuleKind::RestoreMark {
                ifname: "wg-lm0".into(),
                mark: 0x7801,
            },
            RuleKind::ForwardPort {
                proto: Proto::Udp,
                host_port: 5353,
                container: "10.88.0.5:53".parse().unwrap(),
            },
            RuleKind::DropClash {
                ifname: "wg-lm0".into(),
            },
            RuleKind::UntrackReturning,
        ]
    }

    #[test]
    fn comments_round_trip() {
        for k in kinds() {
            let c = k.comment();
            assert!(c.len() < 128, "{c}");
            assert_eq!(RuleKind::from_comment(Some(&c)), k, "{c}");
        }
        assert_eq!(
            RuleKind::from_comment(Some("netavark")),
            RuleKind::Unknown {
                comment: Some("netavark".into())
            }
        );
        assert_eq!(
            RuleKind::from_comment(Some("lm:forward tcp port=1 to=10.0.0.1:2 extra")),
            RuleKind::Unknown {
                comment: Some("lm:forward tcp port=1 to=10.0.0.1:2 extra".into())
            }
        );
        assert_eq!(
            RuleKind::from_comment(None),
            RuleKind::Unknown { comment: None }
        );
    }

    #[test]
    fn rule_json_matches_nft_schema() {
        let [mark, restore, fwd, clash, untrack]: [RuleKind; 5] = kinds().try_into().unwrap();
        let untrack = serde_json::to_value(untrack.to_rule().unwrap()).unwrap();
        assert_eq!(untrack["chain"], "raw_prerouting");
        assert_eq!(
            untrack["expr"],
            json!([
                {"match": {"left": {"meta": {"key": "iifname"}}, "right": "lmwg-*", "op": "=="}},
                {"match": {"left": {"concat": [
                    {"meta": {"key": "l4proto"}},
                    {"payload": {"protocol": "ip", "field": "saddr"}},
                    {"payload": {"protocol": "th", "field": "sport"}},
                    {"payload": {"protocol": "ip", "field": "daddr"}},
                    {"payload": {"protocol": "th", "field": "dport"}}
                ]}, "right": "@returning_flows", "op": "=="}},
                "notrack"
            ])
        );
        let mut batch = serde_json::json!({"nftables": [{"add": {"rule": untrack}}]});
        untangle_notrack(&mut batch);
        assert_eq!(
            batch["nftables"][0]["add"]["rule"]["expr"][2],
            json!({"notrack": null})
        );
        let clash = serde_json::to_value(clash.to_rule().unwrap()).unwrap();
        assert_eq!(clash["chain"], "postrouting");
        assert_eq!(
            clash["expr"],
            json!([
                {"match": {"left": {"meta": {"key": "iifname"}}, "right": "wg-lm0", "op": "=="}},
                {"match": {"left": {"ct": {"key": "state"}}, "right": "new", "op": "in"}},
                {"match": {"left": {"ct": {"key": "status"}}, "right": "snat", "op": "in"}},
                {"drop": null}
            ])
        );
        assert_eq!(
            serde_json::to_value(mark.to_rule().unwrap()).unwrap(),
            json!({
                "family": "inet", "table": "live_migrate", "chain": "prerouting",
                "comment": "lm:mark-tunnel if=wg-lm0 mark=0x7801",
                "expr": [
                    {"match": {"left": {"meta": {"key": "iifname"}}, "right": "wg-lm0", "op": "=="}},
                    {"match": {"left": {"ct": {"key": "state"}}, "right": "new", "op": "in"}},
                    {"mangle": {"key": {"ct": {"key": "mark"}}, "value": 0x7801}}
                ]
            })
        );
        assert_eq!(
            serde_json::to_value(restore.to_rule().unwrap()).unwrap()["expr"],
            json!([
                {"match": {"left": {"meta": {"key": "iifname"}}, "right": "wg-lm0", "op": "!="}},
                {"match": {"left": {"ct": {"key": "mark"}}, "right": 0x7801, "op": "=="}},
                {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"ct": {"key": "mark"}}}}
            ])
        );
        let fwd = serde_json::to_value(fwd.to_rule().unwrap()).unwrap();
        assert_eq!(fwd["chain"], "nat_prerouting");
        assert_eq!(
            fwd["expr"],
            json!([
                {"match": {"left": {"meta": {"key": "nfproto"}}, "right": "ipv4", "op": "=="}},
                {"match": {"left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local", "op": "=="}},
                {"match": {"left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 5353, "op": "=="}},
                {"dnat": {"addr": "10.88.0.5", "family": "ip", "port": 53}}
            ])
        );
    }

    #[test]
    fn skeleton_json() {
        let mut batch = Batch::new();
        add_skeleton(&mut batch);
        let v = serde_json::to_value(batch.to_nftables()).unwrap();
        assert_eq!(
            v["nftables"][1]["add"]["chain"],
            json!({"family": "inet", "table": "live_migrate", "name": "prerouting",
                   "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"})
        );
        assert_eq!(v["nftables"][2]["add"]["chain"]["type"], "nat");
        assert_eq!(v["nftables"][2]["add"]["chain"]["prio"], -110);
        assert_eq!(v["nftables"][3]["add"]["chain"]["hook"], "postrouting");
        assert_eq!(v["nftables"][3]["add"]["chain"]["prio"], 110);
    }

    #[test]
    fn replace_batch_deletes_by_handle_then_adds() {
        let stale = InstalledRule {
            chain: "nat_prerouting".into(),
            handle: 42,
            kind: RuleKind::ForwardPort {
                proto: Proto::Udp,
                host_port: 5353,
                container: "10.88.0.9:53".parse().unwrap(),
            },
        };
        let wanted = kinds()[2].clone();
        assert!(wanted.same_key(&stale.kind));
        let v = serde_json::to_value(replace_batch(&[&stale], &[wanted]).unwrap()).unwrap();
        let cmds = v["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 8);
        assert_eq!(
            cmds[6]["delete"]["rule"],
            json!({"family": "inet", "table": "live_migrate", "chain": "nat_prerouting",
                   "expr": [], "handle": 42})
        );
        assert_eq!(
            cmds[7]["add"]["rule"]["comment"],
            "lm:forward udp port=5353 to=10.88.0.5:53"
        );
    }

    #[test]
    fn rules_are_read_from_nft_json() {
        let doc = json!({"nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "live_migrate", "handle": 7}},
            {"chain": {"family": "inet", "table": "live_migrate", "name": "prerouting", "handle": 1}},
            {"rule": {"family": "inet", "table": "live_migrate", "chain": "prerouting", "handle": 4,
                      "comment": "lm:mark-tunnel if=wg0 mark=0x7801", "expr": []}},
            {"rule": {"family": "inet", "table": "live_migrate", "chain": "prerouting", "handle": 5,
                      "expr": []}},
            {"rule": {"family": "inet", "table": "other", "chain": "x", "handle": 6,
                      "comment": "lm:mark-tunnel if=wg1 mark=0x1", "expr": []}}
        ]});
        let rules = rules_from_json(&doc);
        assert_eq!(
            rules,
            vec![
                InstalledRule {
                    chain: "prerouting".into(),
                    handle: 4,
                    kind: RuleKind::MarkTunnel {
                        ifname: "wg0".into(),
                        mark: 0x7801
                    }
                },
                InstalledRule {
                    chain: "prerouting".into(),
                    handle: 5,
                    kind: RuleKind::Unknown { comment: None }
                },
            ]
        );
        let status = serde_json::to_value(&rules[0]).unwrap();
        assert_eq!(
            status,
            json!({"chain": "prerouting", "handle": 4, "kind": "mark_tunnel", "ifname": "wg0", "mark": 0x7801})
        );
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("wg0").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a-very-long-ifname").is_err());
        assert!(check_ifname("wg0\" accept").is_err());
    }
}
