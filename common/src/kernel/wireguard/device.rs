//! The tunnel interfaces: created, brought to their [`TunnelSpec`], read, and removed.

use std::{
    collections::BTreeSet,
    fmt,
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{debug, info, warn};
use wireguard_control::{AllowedIp, Device, DeviceUpdate, InterfaceName, PeerConfigBuilder};

use super::daemon::{self, backend, SocketOwner, TunnelBackend};
use super::interface::{
    validate_interface_name, wg_name, INTERFACE_PREFIX, TUNNEL_MTU, TUNNEL_TXQUEUELEN,
};
use super::keys::{parse_public_key, Key};
use crate::kernel::routing::Routing;

/// How long starting/configuring an interface may take before we give up.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);

// ------------------------------------------------------------------------------ spec

/// The desired state of one tunnel interface.
#[derive(Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    /// `lmwg-...`, at most 15 bytes.
    pub interface: String,
    pub private_key: Key,
    /// UDP port to listen on; 0 lets the implementation choose (and is then not compared).
    pub listen_port: u16,
    /// The peer agent's public key, base64.
    pub peer_public_key: String,
    /// Where to send the first handshake. `None` = wait for the peer to contact us (an
    /// endpoint learnt from the peer is then kept).
    pub peer_endpoint: Option<SocketAddr>,
    /// The peer's allowed IPs (also the addresses the tunnel routes *to* the peer from
    /// WireGuard's point of view). `ensure_tunnel` makes the peer's list exactly this one;
    /// see [`set_allowed_ips`] for changing it afterwards.
    pub allowed_ips: Vec<(IpAddr, u8)>,
    /// Persistent keepalive interval in seconds (`None` or `Some(0)` = off).
    pub keepalive: Option<u16>,
}

impl fmt::Debug for TunnelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelSpec")
            .field("interface", &self.interface)
            .field("public_key", &self.private_key.get_public().to_base64())
            .field("listen_port", &self.listen_port)
            .field("peer_public_key", &self.peer_public_key)
            .field("peer_endpoint", &self.peer_endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

impl TunnelSpec {
    fn validate(&self) -> Result<(InterfaceName, Key)> {
        let name = wg_name(&self.interface)?;
        let peer = parse_public_key(&self.peer_public_key)?;
        if peer == self.private_key.get_public() {
            bail!(
                "tunnel {}: the peer's public key is our own",
                self.interface
            );
        }
        check_allowed_ips(&self.allowed_ips)?;
        Ok((name, peer))
    }
}

fn check_allowed_ips(ips: &[(IpAddr, u8)]) -> Result<()> {
    for (ip, prefix) in ips {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if *prefix > max {
            bail!("invalid allowed IP {ip}/{prefix}");
        }
    }
    Ok(())
}

fn allowed_set(ips: &[(IpAddr, u8)]) -> BTreeSet<(IpAddr, u8)> {
    ips.iter().map(|(ip, p)| (mask(*ip, *p), *p)).collect()
}

fn allowed_set_of(ips: &[AllowedIp]) -> BTreeSet<(IpAddr, u8)> {
    ips.iter()
        .map(|a| (mask(a.address, a.cidr), a.cidr))
        .collect()
}

/// `ip` with the host bits beyond `prefix` cleared (WireGuard stores allowed IPs that way).
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            IpAddr::V6((bits & m).into())
        }
    }
}

// ------------------------------------------------------------------ blocking helpers

async fn blocking<T: Send + 'static>(
    what: String,
    timeout: Duration,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Err(_) => bail!("{what}: timed out after {timeout:?}"),
        Ok(Err(join)) => bail!("{what}: task failed: {join}"),
        Ok(Ok(Err(e))) => Err(anyhow!(e).context(what)),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

async fn get_device(name: InterfaceName, be: TunnelBackend) -> Result<Device> {
    blocking(
        format!("reading WireGuard configuration of {name} ({be})"),
        APPLY_TIMEOUT,
        move || Device::get(&name, be.wg()),
    )
    .await
}

async fn apply(update: DeviceUpdate, name: InterfaceName, be: TunnelBackend) -> Result<()> {
    let what = format!("configuring WireGuard interface {name} ({be})");
    blocking(what, APPLY_TIMEOUT, move || update.apply(&name, be.wg())).await
}

// ------------------------------------------------------------------------ operations

fn peer_builder(
    spec: &TunnelSpec,
    peer: &Key,
    current_keepalive: Option<u16>,
) -> PeerConfigBuilder {
    let mut b = PeerConfigBuilder::new(peer).replace_allowed_ips();
    if let Some(ep) = spec.peer_endpoint {
        b = b.set_endpoint(ep);
    }
    match spec.keepalive.filter(|k| *k != 0) {
        Some(k) => b = b.set_persistent_keepalive_interval(k),
        None if current_keepalive.is_some() => b = b.unset_persistent_keepalive(),
        None => {}
    }
    for (ip, prefix) in &spec.allowed_ips {
        b = b.add_allowed_ip(*ip, *prefix);
    }
    b
}

/// The configuration change that turns `dev` into `spec`, or `None` if it already matches.
fn device_delta(spec: &TunnelSpec, peer: &Key, dev: &Device) -> Option<DeviceUpdate> {
    let mut update = DeviceUpdate::new();
    let mut changed = false;
    if dev.private_key.as_ref() != Some(&spec.private_key) {
        update = update.set_private_key(spec.private_key.clone());
        changed = true;
    }
    if spec.listen_port != 0 && dev.listen_port != Some(spec.listen_port) {
        update = update.set_listen_port(spec.listen_port);
        changed = true;
    }
    for other in dev.peers.iter().filter(|p| &p.config.public_key != peer) {
        update = update.remove_peer_by_key(&other.config.public_key);
        changed = true;
    }
    let current = dev.peers.iter().find(|p| &p.config.public_key == peer);
    let current_keepalive = current
        .and_then(|p| p.config.persistent_keepalive_interval)
        .filter(|k| *k != 0);
    let peer_ok = current.is_some_and(|p| {
        (spec.peer_endpoint.is_none() || p.config.endpoint == spec.peer_endpoint)
            && current_keepalive == spec.keepalive.filter(|k| *k != 0)
            && allowed_set_of(&p.config.allowed_ips) == allowed_set(&spec.allowed_ips)
    });
    if !peer_ok {
        update = update.add_peer(peer_builder(spec, peer, current_keepalive));
        changed = true;
    }
    changed.then_some(update)
}

/// After a failed configuration: " already in use" if binding the UDP port fails with
/// EADDRINUSE in this namespace (the userspace backend reports every error as "invalid
/// input"), else "".
fn port_hint(port: u16) -> &'static str {
    if port == 0 {
        return "";
    }
    let in_use = |addr: IpAddr| {
        matches!(
            std::net::UdpSocket::bind((addr, port)),
            Err(e) if e.kind() == ErrorKind::AddrInUse
        )
    };
    if in_use(IpAddr::from([0u8; 4])) || in_use(IpAddr::from([0u16; 8])) {
        " already in use"
    } else {
        ""
    }
}

/// Create or update the tunnel interface described by `spec` in the caller's network
/// namespace, then set its MTU to [`TUNNEL_MTU`], its transmit queue to
/// [`TUNNEL_TXQUEUELEN`], and bring it up.
///
/// * Missing interface: created with the [`backend()`] (userspace: `wireguard-go` is
///   started), configured with key, port and exactly one peer.
/// * Existing, healthy interface: only what differs is changed (other peers removed, the
///   peer's endpoint/keepalive/allowed IPs updated, key or port changed) without dropping the
///   peer's session; nothing at all is written if it already matches (cost: one link lookup
///   and one configuration read).
/// * Half-made interface (link without a readable WireGuard configuration, configuration
///   without private key, link down, a userspace socket without link): torn down and created
///   again.
pub async fn ensure_tunnel(spec: &TunnelSpec) -> Result<()> {
    let (name, peer) = spec.validate()?;
    let ifname = spec.interface.as_str();
    let be = backend();
    let routing = Routing::new()?;
    let started = Instant::now();

    let mut link = routing.link(ifname).await?;
    let owner = daemon::socket_owner(ifname);
    if let SocketOwner::Elsewhere { pid } = owner {
        bail!(
            "cannot manage {ifname}: {} belongs to process {pid} in another network namespace",
            daemon::socket_path(ifname).display()
        );
    }

    // What exists, and is it usable?
    let exists = link.is_some() || matches!(owner, SocketOwner::Here { .. } | SocketOwner::Stale);
    let mut device = None;
    let mut broken: Option<String> = None;
    if exists {
        let readable = match be {
            TunnelBackend::Userspace => matches!(owner, SocketOwner::Here { .. }),
            TunnelBackend::Kernel => link
                .as_ref()
                .is_some_and(|l| l.kind.as_deref() == Some("wireguard")),
        };
        if link.is_none() {
            broken = Some("socket without link".into());
        } else if !readable {
            broken = Some(format!(
                "link (kind {:?}) has no {be} WireGuard device",
                link.as_ref().and_then(|l| l.kind.clone())
            ));
        } else {
            match get_device(name, be).await {
                Err(e) => broken = Some(format!("{e:#}")),
                Ok(dev) if dev.private_key.is_none() => broken = Some("no private key".into()),
                Ok(dev) => device = Some(dev),
            }
            if broken.is_none() && !link.as_ref().is_some_and(|l| l.up) {
                broken = Some("link is down".into());
            }
        }
    }
    if let Some(why) = broken {
        warn!(interface = ifname, reason = %why, "half-made WireGuard interface; recreating");
        remove_tunnel(ifname).await?;
        device = None;
        link = None;
    }

    match &device {
        None => {
            let update = DeviceUpdate::new()
                .set_private_key(spec.private_key.clone())
                .set_listen_port(spec.listen_port)
                .replace_peers()
                .add_peer(peer_builder(spec, &peer, None));
            if let Err(e) = apply(update, name, be).await {
                // Do not leave a half-made interface (or a stuck daemon) behind.
                if let Err(cleanup) = remove_tunnel(ifname).await {
                    warn!(
                        interface = ifname,
                        "cleanup after failed creation: {cleanup:#}"
                    );
                }
                return Err(e.context(format!(
                    "creating tunnel {ifname} (listen port {}{}, peer {})",
                    spec.listen_port,
                    port_hint(spec.listen_port),
                    spec.peer_public_key
                )));
            }
            info!(interface = ifname, backend = %be, elapsed = ?started.elapsed(), "created WireGuard interface");
            link = routing.link(ifname).await?;
        }
        Some(dev) => {
            if let Some(update) = device_delta(spec, &peer, dev) {
                apply(update, name, be).await.with_context(|| {
                    format!(
                        "reconfiguring tunnel {ifname} (listen port {}{}, peer {})",
                        spec.listen_port,
                        port_hint(spec.listen_port),
                        spec.peer_public_key
                    )
                })?;
                info!(interface = ifname, "reconfigured WireGuard interface");
            }
        }
    }

    let link = link.ok_or_else(|| {
        anyhow!("WireGuard interface {ifname} was configured but no link of that name exists in this network namespace")
    })?;
    if link.mtu != Some(TUNNEL_MTU) || link.txqueuelen != Some(TUNNEL_TXQUEUELEN) || !link.up {
        routing
            .configure_link_up(ifname, TUNNEL_MTU, TUNNEL_TXQUEUELEN)
            .await?;
    }
    debug!(interface = ifname, elapsed = ?started.elapsed(), "ensure_tunnel done");
    Ok(())
}

/// Make the allowed IPs of `peer_public_key` on `interface` exactly `ips` (WireGuard's
/// `replace_allowed_ips`); the peer's endpoint, keepalive and session are kept. Errors if
/// the interface or the peer does not exist (it never creates a peer).
pub async fn set_allowed_ips(
    interface: &str,
    peer_public_key: &str,
    ips: &[(IpAddr, u8)],
) -> Result<()> {
    let name = wg_name(interface)?;
    let peer = parse_public_key(peer_public_key)?;
    check_allowed_ips(ips)?;
    let be = backend();
    let dev = get_device(name, be).await?;
    let Some(current) = dev.peers.iter().find(|p| p.config.public_key == peer) else {
        bail!("interface {interface} has no peer {peer_public_key}");
    };
    if allowed_set_of(&current.config.allowed_ips) == allowed_set(ips) {
        return Ok(());
    }
    let mut b = PeerConfigBuilder::new(&peer).replace_allowed_ips();
    for (ip, prefix) in ips {
        b = b.add_allowed_ip(*ip, *prefix);
    }
    apply(DeviceUpdate::new().add_peer(b), name, be)
        .await
        .with_context(|| format!("setting allowed IPs of {peer_public_key} on {interface}"))
}

/// Summary of a tunnel as the implementation reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelInfo {
    pub interface: String,
    pub public_key: Option<String>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerInfo>,
}

/// One peer of a [`TunnelInfo`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    pub keepalive: Option<u16>,
    pub last_handshake: Option<std::time::SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Read the current state of `interface`.
pub async fn tunnel_info(interface: &str) -> Result<TunnelInfo> {
    let name = wg_name(interface)?;
    let dev = get_device(name, backend()).await?;
    Ok(TunnelInfo {
        interface: interface.to_string(),
        public_key: dev.public_key.as_ref().map(Key::to_base64),
        listen_port: dev.listen_port,
        peers: dev
            .peers
            .iter()
            .map(|p| PeerInfo {
                public_key: p.config.public_key.to_base64(),
                endpoint: p.config.endpoint,
                allowed_ips: p
                    .config
                    .allowed_ips
                    .iter()
                    .map(|a| (a.address, a.cidr))
                    .collect(),
                keepalive: p.config.persistent_keepalive_interval.filter(|k| *k != 0),
                last_handshake: p.stats.last_handshake_time,
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
            })
            .collect(),
    })
}

/// Delete `interface` (one of ours: the name must carry [`INTERFACE_PREFIX`]). For the
/// userspace backend the link is deleted and the UAPI socket removed, then the
/// `wireguard-go` daemon is waited for (up to 2 s) and sent SIGTERM if still alive.
/// Succeeds if there was nothing to remove. A socket of that name owned by a daemon in
/// another network namespace is left alone.
pub async fn remove_tunnel(interface: &str) -> Result<()> {
    validate_interface_name(interface)?;
    let routing = Routing::new()?;
    let owner = daemon::socket_owner(interface);
    let deleted = routing
        .delete_link(interface)
        .await
        .with_context(|| format!("removing WireGuard interface {interface}"))?;
    let pid = owner.remove_socket(interface);
    if let Some(pid) = pid {
        daemon::await_exit(pid, interface).await?;
    }
    if deleted || pid.is_some() {
        info!(interface, "removed WireGuard interface");
    }
    Ok(())
}

/// The agent's WireGuard interfaces (`lmwg-*`) in the caller's network namespace.
pub fn list_tunnels() -> Vec<String> {
    let mut names = BTreeSet::new();
    if backend() == TunnelBackend::Kernel {
        match Device::list(TunnelBackend::Kernel.wg()) {
            Ok(list) => names.extend(list.iter().map(|n| n.as_str_lossy().into_owned())),
            Err(e) => warn!("listing kernel WireGuard interfaces: {e}"),
        }
    }
    // Userspace: the sockets whose daemon is in our namespace and whose link exists here.
    names.extend(
        daemon::served_here()
            .into_iter()
            .filter(|name| link_exists(name)),
    );
    names
        .into_iter()
        .filter(|n| n.starts_with(INTERFACE_PREFIX))
        .collect()
}

fn link_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::wireguard::KeyPair;

    #[test]
    fn spec_validation() {
        let ours = KeyPair::generate();
        let theirs = KeyPair::generate();
        let mut spec = TunnelSpec {
            interface: "lmwg-t".into(),
            private_key: ours.private_key().clone(),
            listen_port: 51820,
            peer_public_key: theirs.public_base64(),
            peer_endpoint: None,
            allowed_ips: vec![("10.0.0.0".parse().unwrap(), 24)],
            keepalive: Some(25),
        };
        assert!(spec.validate().is_ok());
        assert!(!format!("{spec:?}").contains(&ours.private_key().to_base64()));
        spec.allowed_ips.push(("10.0.0.1".parse().unwrap(), 33));
        assert!(spec.validate().is_err());
        spec.allowed_ips.pop();
        spec.peer_public_key = ours.public_base64();
        assert!(spec.validate().is_err());
        spec.peer_public_key = "garbage".into();
        assert!(spec.validate().is_err());
        spec.peer_public_key = theirs.public_base64();
        spec.interface = "wg0".into();
        assert!(spec.validate().is_err());
    }

    #[test]
    fn masking() {
        assert_eq!(
            mask("10.1.2.3".parse().unwrap(), 24),
            "10.1.2.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("10.1.2.3".parse().unwrap(), 0),
            "0.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            mask("fd00::1:2".parse().unwrap(), 112),
            "fd00::1:0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            allowed_set(&[("10.0.0.7".parse().unwrap(), 32)]),
            allowed_set_of(&["10.0.0.7/32".parse().unwrap()])
        );
    }
}
