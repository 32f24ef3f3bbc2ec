//! The agent's rules: what each is for ([`RuleKind`]), the comment that identifies it, and
//! its nftables expression.

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::SocketAddrV4;

use anyhow::{bail, Result};
use nftables::{
    expr::{
        Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField,
        CT,
    },
    schema::Rule,
    stmt::{Mangle, Match, NATFamily, Operator, Statement, NAT},
};
use serde::{Deserialize, Serialize};

use super::names::*;
use crate::kernel::conntrack::Proto;

pub(super) const COMMENT_PREFIX: &str = "lm:";

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
    /// `ip daddr <server ip> tcp dport <server port> ip saddr != <peer> drop` (chain
    /// `prerouting`): only the destination reaches CRIU's page server.
    GuardPages {
        server: SocketAddrV4,
        peer: std::net::Ipv4Addr,
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
            RuleKind::GuardPages { server, peer } => {
                format!("{COMMENT_PREFIX}guard-pages at={server} from={peer}")
            }
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
    pub(super) fn statements(&self) -> Result<Vec<Statement<'static>>> {
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
            RuleKind::GuardPages { server, peer } => vec![
                matches(meta(MetaKey::Nfproto), Operator::EQ, string("ipv4")),
                matches(
                    payload("ip", "daddr"),
                    Operator::EQ,
                    string(&server.ip().to_string()),
                ),
                matches(
                    payload("tcp", "dport"),
                    Operator::EQ,
                    Expression::Number(u32::from(server.port())),
                ),
                matches(
                    payload("ip", "saddr"),
                    Operator::NEQ,
                    string(&peer.to_string()),
                ),
                Statement::Drop(None),
            ],
            RuleKind::Unknown { .. } => bail!("cannot build an unknown rule"),
        })
    }

    /// Rules with the same key replace each other: one mark per tunnel, one forward per
    /// (protocol, host port).
    pub(super) fn same_key(&self, other: &RuleKind) -> bool {
        match (self, other) {
            (RuleKind::MarkTunnel { ifname: a, .. }, RuleKind::MarkTunnel { ifname: b, .. })
            | (RuleKind::RestoreMark { ifname: a, .. }, RuleKind::RestoreMark { ifname: b, .. })
            | (RuleKind::DropClash { ifname: a }, RuleKind::DropClash { ifname: b }) => a == b,
            (RuleKind::UntrackReturning, RuleKind::UntrackReturning) => true,
            (RuleKind::GuardPages { server: a, .. }, RuleKind::GuardPages { server: b, .. }) => {
                a == b
            }
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

pub(super) fn parse_comment(c: &str) -> Option<RuleKind> {
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
        "guard-pages" => RuleKind::GuardPages {
            server: field(words.next(), "at")?.parse().ok()?,
            peer: field(words.next(), "from")?.parse().ok()?,
        },
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

pub(super) fn check_ifname(ifname: &str) -> Result<()> {
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

pub(super) fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

pub(super) fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

pub(super) fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.to_string().into(),
            field: field.to_string().into(),
        },
    )))
}

pub(super) fn string(s: &str) -> Expression<'static> {
    Expression::String(s.to_owned().into())
}

pub(super) fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}
