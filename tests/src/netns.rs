//! Network namespaces and the LAN joining them.
//!
//! Every `ip` call names its namespace (`ip -n NS ...`): nothing here ever adds a link,
//! route, rule or firewall entry to the root network namespace.

use std::fs::File;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

use crate::cmd;
use crate::plan::{LabDescription, NsFiles, LAN_PREFIX_LEN, NETNS_DIR};

/// Whether `ip netns` knows `name`.
pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// `ip netns add NAME`.
pub fn add(name: &str) -> Result<()> {
    cmd::run(Command::new("ip").args(["netns", "add", name]))
}

/// `ip netns delete NAME` if it exists.
pub fn delete(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    cmd::run(Command::new("ip").args(["netns", "delete", name]))
}

/// `ip -n NETNS ARGS...`
pub fn ip(netns: &str, args: &[&str]) -> Result<()> {
    cmd::run(Command::new("ip").arg("-n").arg(netns).args(args))
}

/// Creates every network namespace of the lab and wires them to one bridge:
/// `<lab>-lan` holds `br0`; each host/client gets a veth whose inside end is `eth0`.
pub fn setup_lan(desc: &LabDescription) -> Result<()> {
    let lan = &desc.lan.netns;
    for ns in desc.all_netns() {
        add(&ns).with_context(|| format!("creating network namespace {ns}"))?;
    }
    ip(lan, &["link", "set", "lo", "up"])?;
    ip(lan, &["link", "add", &desc.lan.bridge, "type", "bridge"])?;
    ip(lan, &["link", "set", &desc.lan.bridge, "up"])?;

    let nodes = desc
        .hosts
        .iter()
        .map(|h| (&h.name, &h.ns, h.address))
        .chain(std::iter::once((
            &desc.client.name,
            &desc.client.ns,
            desc.client.address,
        )));
    for (node, ns, addr) in nodes {
        // The LAN-side end is named after the node ("h1", "client"): short and unique.
        ip(
            lan,
            &[
                "link", "add", node, "type", "veth", "peer", "name", "eth0", "netns", &ns.netns,
            ],
        )?;
        ip(
            lan,
            &["link", "set", node, "master", &desc.lan.bridge, "up"],
        )?;
        let cidr = format!("{addr}/{LAN_PREFIX_LEN}");
        ip(&ns.netns, &["addr", "add", &cidr, "dev", "eth0"])?;
        ip(&ns.netns, &["link", "set", "eth0", "up"])?;
        ip(&ns.netns, &["link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has joined network namespace `netns_path`.
///
/// The network namespace is a per-thread attribute, so only that helper thread moves; the
/// caller's threads stay in the root namespace. Sockets created inside `f` stay bound to
/// the lab namespace for their whole life, so a `TcpStream` returned from `f` can be used
/// from any thread afterwards: that is how a test talks to containers from "the client".
pub fn in_netns<T: Send>(netns_path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(netns_path)
        .with_context(|| format!("opening network namespace {}", netns_path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // Affects only this thread.
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns({})", netns_path.display()))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread inside {} panicked", netns_path.display()))?
    })
}

/// Connects to `addr` from inside a node's network namespace.
pub fn connect_tcp(ns: &NsFiles, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    in_netns(&ns.netns_path, || {
        TcpStream::connect_timeout(&addr, timeout)
    })?
    .with_context(|| format!("connecting to {addr} from {}", ns.netns))
}

/// A UDP socket bound to `bind` inside a node's network namespace.
pub fn bind_udp(ns: &NsFiles, bind: SocketAddr) -> Result<UdpSocket> {
    in_netns(&ns.netns_path, || UdpSocket::bind(bind))?
        .with_context(|| format!("binding UDP {bind} in {}", ns.netns))
}
