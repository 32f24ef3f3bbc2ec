//! An ICMP echo, awaited. Sent through a WireGuard tunnel, its answer comes back behind
//! every packet the peer had sent into the tunnel before the request reached it:
//! wireguard-go and the kernel's WireGuard keep one peer's packets in order.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use surge_ping::{Client, Config, PingIdentifier, PingSequence};

/// Sends `peer` an echo request and waits up to `timeout` for its answer; returns how long
/// that took, the socket's opening included.
pub async fn round_trip(peer: Ipv4Addr, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    // A ping socket where the namespace allows it (`ping_group_range`), else a raw one.
    let client = Client::new(&Config::default()).context("opening an ICMP socket")?;
    let mut pinger = client
        .pinger(IpAddr::V4(peer), PingIdentifier(rand::random()))
        .await;
    pinger.timeout(timeout);
    pinger
        .ping(PingSequence(0), &[0; 8])
        .await
        .with_context(|| format!("ICMP echo to {peer}"))?;
    Ok(start.elapsed())
}
