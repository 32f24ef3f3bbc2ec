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

mod firewall;
mod names;
mod rules;
mod table;
#[cfg(test)]
mod tests;

pub use firewall::Firewall;
pub use names::*;
pub use rules::{InstalledRule, RuleKind};
