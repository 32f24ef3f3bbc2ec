//! Pure planning logic: lab names, the address plan and the serialisable lab description.
//!
//! Nothing here touches the system, so all of it is unit-tested. Every path and address a
//! lab uses is derived here from the lab name and host count, which is what lets teardown
//! and `gc` work from the name alone even when `state.json` is missing or half-written.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Runtime state of every lab (namespace files, logs, pid files, the token).
pub const RUN_ROOT: &str = "/run/lm-lab";
/// On-disk data of every lab (container storage, agent state).
pub const DATA_ROOT: &str = "/var/lib/lm-lab";
/// Where `ip netns` keeps named network namespaces (in the root mount namespace).
pub const NETNS_DIR: &str = "/run/netns";
/// The agent's default listening port (agent-server's built-in default).
pub const AGENT_PORT: u16 = 7878;
/// The LAN all hosts and the client sit on.
pub const LAN_SUBNET: &str = "10.77.0.0/24";
/// Prefix length of [`LAN_SUBNET`].
pub const LAN_PREFIX_LEN: u8 = 24;
/// The address of the client namespace.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// The container subnet: the same on every host so a migrated container keeps its IP.
pub const CONTAINER_SUBNET: &str = "10.88.0.0/16";
/// Gateway of [`CONTAINER_SUBNET`] (the `podman0` bridge on every host).
pub const CONTAINER_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// Paths as seen *inside* a host.
pub const PODMAN_SOCKET: &str = "/run/podman/podman.sock";
/// Token file read by agent-server by default (inside a host).
pub const TOKEN_FILE_IN_HOST: &str = "/etc/live-migrate/token";
/// The agents' default state directory (inside a host).
pub const STATE_DIR_IN_HOST: &str = "/var/lib/live-migrate";
/// Most hosts a lab may have: host addresses 10.77.0.11.. must stay below the client's .100
/// and every host needs its own /24 lease range inside 10.88.0.0/16.
pub const MAX_HOSTS: usize = 50;
/// Name of the client node.
pub const CLIENT: &str = "client";

/// A random lab name: `lm` + 6 lowercase alphanumerics (short, because interface and
/// namespace names derived from it must stay readable and well under system limits).
pub fn random_name() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..6)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("lm{suffix}")
}

/// Lab names become directory and namespace names, so only a safe alphabet is allowed.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 32 {
        bail!("lab name {name:?} must be 1..=32 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        bail!("lab name {name:?} must start with a lowercase letter");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        bail!("lab name {name:?} may only contain a-z, 0-9, '-' and '_'");
    }
    Ok(())
}

/// Name of host number `index` (1-based): `h1`, `h2`, ...
pub fn host_name(index: usize) -> String {
    format!("h{index}")
}

/// Parses `hN` back into N.
pub fn host_index(name: &str) -> Option<usize> {
    let n: usize = name.strip_prefix('h')?.parse().ok()?;
    ((1..=MAX_HOSTS).contains(&n) && host_name(n) == name).then_some(n)
}

/// LAN address of host `index`: 10.77.0.(10+index).
pub fn host_addr(index: usize) -> Ipv4Addr {
    assert!((1..=MAX_HOSTS).contains(&index), "host index {index}");
    Ipv4Addr::new(10, 77, 0, 10 + index as u8)
}

/// Podman IPAM lease range of host `index` inside 10.88.0.0/16: 10.88.index.2 - .254.
/// Disjoint per host, so a container restored on another host never collides with one
/// started there.
pub fn lease_range(index: usize) -> (Ipv4Addr, Ipv4Addr) {
    assert!((1..=MAX_HOSTS).contains(&index), "host index {index}");
    let n = index as u8;
    (Ipv4Addr::new(10, 88, n, 2), Ipv4Addr::new(10, 88, n, 254))
}

/// Name of a lab's network namespace for `node` (`lan`, `client`, `h1`, ...).
pub fn netns_name(lab: &str, node: &str) -> String {
    format!("{lab}-{node}")
}

/// Directory of a lab's runtime state.
pub fn lab_dir(lab: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(lab)
}

/// Directory of a lab's on-disk data.
pub fn lab_data_dir(lab: &str) -> PathBuf {
    Path::new(DATA_ROOT).join(lab)
}

/// Directory holding a lab's namespace files; it is a private bind mount of itself, which
/// `unshare --mount=FILE` requires for the file's directory.
pub fn ns_dir(lab: &str) -> PathBuf {
    lab_dir(lab).join("ns")
}

/// The namespace files (mount + UTS) of a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NsFiles {
    /// Network namespace name (as for `ip netns`).
    pub netns: String,
    /// Path of the network namespace file in the root mount namespace.
    pub netns_path: PathBuf,
    /// Persistent mount namespace file.
    pub mount_ns: PathBuf,
    /// Persistent UTS namespace file (so `hostname` inside a host says `h1`).
    pub uts_ns: PathBuf,
}

impl NsFiles {
    fn new(lab: &str, node: &str) -> NsFiles {
        let netns = netns_name(lab, node);
        NsFiles {
            netns_path: Path::new(NETNS_DIR).join(&netns),
            netns,
            mount_ns: ns_dir(lab).join(format!("{node}.mnt")),
            uts_ns: ns_dir(lab).join(format!("{node}.uts")),
        }
    }
}

/// One simulated host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HostDescription {
    /// `h1`, `h2`, ...
    pub name: String,
    #[serde(flatten)]
    pub ns: NsFiles,
    /// Address on the LAN (interface `eth0` inside the host).
    pub address: Ipv4Addr,
    /// agent-server's address (`address:7878`).
    pub agent_addr: SocketAddrV4,
    /// Podman REST socket as seen inside the host.
    pub podman_socket: PathBuf,
    /// The same socket as seen from the root mount namespace (usable by the test process
    /// directly: unix sockets are reached through the file system, not the network).
    pub podman_socket_host_path: PathBuf,
    /// Per-host runtime directory (logs, pid files, the host's private /run and /etc bits).
    pub dir: PathBuf,
    /// Per-host data directory (container storage, agent state).
    pub data_dir: PathBuf,
    /// Podman's container subnet (identical on every host).
    pub container_subnet: String,
    /// First address podman may hand out on this host.
    pub lease_start: Ipv4Addr,
    /// Last address podman may hand out on this host.
    pub lease_end: Ipv4Addr,
}

/// The client namespace (traffic generator beside the hosts).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClientDescription {
    pub name: String,
    #[serde(flatten)]
    pub ns: NsFiles,
    pub address: Ipv4Addr,
    pub dir: PathBuf,
}

/// The LAN namespace holding the bridge.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LanDescription {
    pub netns: String,
    pub bridge: String,
    pub subnet: String,
}

/// Everything a test (or a person) needs to know about a running lab. `lab up` prints it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LabDescription {
    pub name: String,
    /// `/run/lm-lab/<name>`.
    pub dir: PathBuf,
    /// `/var/lib/lm-lab/<name>`.
    pub data_dir: PathBuf,
    /// The shared agent token (also copied to every host's /etc/live-migrate/token).
    pub token_file: PathBuf,
    pub lan: LanDescription,
    pub hosts: Vec<HostDescription>,
    pub client: ClientDescription,
    /// Directory holding agent-server / agent-client, prepended to PATH inside hosts.
    pub bin_dir: Option<PathBuf>,
}

impl LabDescription {
    /// The full plan of lab `name` with `hosts` hosts.
    pub fn plan(name: &str, hosts: usize, bin_dir: Option<PathBuf>) -> Result<LabDescription> {
        validate_name(name)?;
        if !(1..=MAX_HOSTS).contains(&hosts) {
            bail!("a lab needs 1..={MAX_HOSTS} hosts, got {hosts}");
        }
        let dir = lab_dir(name);
        let data_dir = lab_data_dir(name);
        let hosts = (1..=hosts)
            .map(|i| {
                let host = host_name(i);
                let host_dir = dir.join(&host);
                let (lease_start, lease_end) = lease_range(i);
                HostDescription {
                    ns: NsFiles::new(name, &host),
                    address: host_addr(i),
                    agent_addr: SocketAddrV4::new(host_addr(i), AGENT_PORT),
                    podman_socket: PathBuf::from(PODMAN_SOCKET),
                    podman_socket_host_path: host_dir.join("run/podman/podman.sock"),
                    dir: host_dir,
                    data_dir: data_dir.join(&host),
                    container_subnet: CONTAINER_SUBNET.to_string(),
                    lease_start,
                    lease_end,
                    name: host,
                }
            })
            .collect();
        Ok(LabDescription {
            name: name.to_string(),
            token_file: dir.join("token"),
            lan: LanDescription {
                netns: netns_name(name, "lan"),
                bridge: "br0".to_string(),
                subnet: LAN_SUBNET.to_string(),
            },
            hosts,
            client: ClientDescription {
                name: CLIENT.to_string(),
                ns: NsFiles::new(name, CLIENT),
                address: CLIENT_ADDR,
                dir: dir.join(CLIENT),
            },
            dir,
            data_dir,
            bin_dir,
        })
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> Option<&HostDescription> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The namespaces of a node (host or client) by name.
    pub fn node_ns(&self, node: &str) -> Option<&NsFiles> {
        if node == CLIENT {
            return Some(&self.client.ns);
        }
        self.host(node).map(|h| &h.ns)
    }

    /// Every network namespace of the lab (LAN, hosts, client).
    pub fn all_netns(&self) -> Vec<String> {
        let mut v = vec![self.lan.netns.clone()];
        v.extend(self.hosts.iter().map(|h| h.ns.netns.clone()));
        v.push(self.client.ns.netns.clone());
        v
    }

    /// `/etc/hosts` content shared by every node: every host and the client by name.
    pub fn etc_hosts(&self) -> String {
        let mut s =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        for h in &self.hosts {
            s.push_str(&format!("{}\t{}\n", h.address, h.name));
        }
        s.push_str(&format!("{}\t{}\n", self.client.address, self.client.name));
        s
    }
}

/// The netavark network definition that replaces podman's default network in host `host`:
/// same subnet everywhere, a disjoint lease range per host.
pub fn podman_network_json(host: &HostDescription) -> serde_json::Value {
    serde_json::json!({
        "name": "podman",
        // podman's fixed id for its default network
        "id": "2f259bab93aaaaa2542ba43ef33eb990d0999ee1b9924b557b7be53c0b7a1bb9",
        "driver": "bridge",
        "network_interface": "podman0",
        "created": "2024-01-01T00:00:00Z",
        "subnets": [{
            "subnet": host.container_subnet,
            "gateway": CONTAINER_GATEWAY.to_string(),
            "lease_range": {
                "start_ip": host.lease_start.to_string(),
                "end_ip": host.lease_end.to_string(),
            }
        }],
        "ipv6_enabled": false,
        "internal": false,
        "dns_enabled": false,
        "ipam_options": { "driver": "host-local" }
    })
}

/// Who owns a lab: the process whose death makes the lab garbage. `start_time` (from
/// /proc/PID/stat) guards against pid reuse.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start_time: u64,
}

/// The content of `/run/lm-lab/<name>/state.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LabState {
    /// `None` for labs created by the CLI: they live until `lab down` (or `gc --all`).
    pub owner: Option<Owner>,
    /// Seconds since the epoch.
    pub created_at: u64,
    pub description: LabDescription,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_names_are_valid_and_differ() {
        let a = random_name();
        let b = random_name();
        assert_eq!(a.len(), 8);
        assert!(a.starts_with("lm"));
        validate_name(&a).unwrap();
        assert!(a[2..]
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        // 36^6 possibilities: a collision here means the generator is broken.
        assert_ne!(a, b);
    }

    #[test]
    fn name_validation() {
        for ok in ["lm", "lmabc123", "my-lab_2"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "Lm", "1lab", "a/b", "a b", "lab.x", &"x".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn address_plan() {
        assert_eq!(host_addr(1), Ipv4Addr::new(10, 77, 0, 11));
        assert_eq!(host_addr(3), Ipv4Addr::new(10, 77, 0, 13));
        assert_eq!(
            lease_range(2),
            (Ipv4Addr::new(10, 88, 2, 2), Ipv4Addr::new(10, 88, 2, 254))
        );
        assert!(host_addr(MAX_HOSTS) < CLIENT_ADDR);
        assert_eq!(host_index("h7"), Some(7));
        assert_eq!(host_index("h07"), None);
        assert_eq!(host_index("client"), None);
        assert_eq!(host_index("h0"), None);
    }

    #[test]
    fn plan_paths_and_ranges_are_disjoint() {
        let d = LabDescription::plan("lmtest01", 3, None).unwrap();
        assert_eq!(d.hosts.len(), 3);
        let h2 = d.host("h2").unwrap();
        assert_eq!(h2.ns.netns, "lmtest01-h2");
        assert_eq!(h2.ns.netns_path, Path::new("/run/netns/lmtest01-h2"));
        assert_eq!(h2.ns.mount_ns, Path::new("/run/lm-lab/lmtest01/ns/h2.mnt"));
        assert_eq!(h2.agent_addr.to_string(), "10.77.0.12:7878");
        assert_eq!(
            h2.podman_socket_host_path,
            Path::new("/run/lm-lab/lmtest01/h2/run/podman/podman.sock")
        );
        assert_eq!(h2.data_dir, Path::new("/var/lib/lm-lab/lmtest01/h2"));
        for (a, b) in [(0, 1), (1, 2), (0, 2)] {
            let (x, y) = (&d.hosts[a], &d.hosts[b]);
            assert!(x.lease_end < y.lease_start || y.lease_end < x.lease_start);
        }
        assert_eq!(
            d.all_netns(),
            [
                "lmtest01-lan",
                "lmtest01-h1",
                "lmtest01-h2",
                "lmtest01-h3",
                "lmtest01-client"
            ]
        );
        assert_eq!(d.node_ns("client").unwrap().netns, "lmtest01-client");
        assert!(d.node_ns("h4").is_none());
        assert!(LabDescription::plan("lmtest01", 0, None).is_err());
        assert!(LabDescription::plan("lmtest01", MAX_HOSTS + 1, None).is_err());
    }

    #[test]
    fn etc_hosts_lists_every_node() {
        let d = LabDescription::plan("lmx", 2, None).unwrap();
        let hosts = d.etc_hosts();
        assert!(hosts.contains("10.77.0.11\th1\n"));
        assert!(hosts.contains("10.77.0.12\th2\n"));
        assert!(hosts.contains("10.77.0.100\tclient\n"));
        assert!(hosts.starts_with("127.0.0.1\tlocalhost"));
    }

    #[test]
    fn description_json_round_trip_and_shape() {
        let d = LabDescription::plan("lmjson", 2, Some(PathBuf::from("/bin"))).unwrap();
        let state = LabState {
            owner: Some(Owner {
                pid: 42,
                start_time: 7,
            }),
            created_at: 1,
            description: d.clone(),
        };
        let text = serde_json::to_string_pretty(&state).unwrap();
        let back: LabState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, state);

        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["name"], "lmjson");
        assert_eq!(v["token_file"], "/run/lm-lab/lmjson/token");
        assert_eq!(v["hosts"][0]["name"], "h1");
        // NsFiles is flattened into the host object.
        assert_eq!(v["hosts"][0]["netns"], "lmjson-h1");
        assert_eq!(v["hosts"][0]["address"], "10.77.0.11");
        assert_eq!(v["hosts"][1]["agent_addr"], "10.77.0.12:7878");
        assert_eq!(v["hosts"][1]["podman_socket"], "/run/podman/podman.sock");
        assert_eq!(v["client"]["address"], "10.77.0.100");
        assert_eq!(v["client"]["netns"], "lmjson-client");
    }

    #[test]
    fn podman_network_has_per_host_lease_range() {
        let d = LabDescription::plan("lmnet", 2, None).unwrap();
        let v = podman_network_json(d.host("h2").unwrap());
        assert_eq!(v["name"], "podman");
        assert_eq!(v["subnets"][0]["subnet"], "10.88.0.0/16");
        assert_eq!(v["subnets"][0]["gateway"], "10.88.0.1");
        assert_eq!(v["subnets"][0]["lease_range"]["start_ip"], "10.88.2.2");
        assert_eq!(v["subnets"][0]["lease_range"]["end_ip"], "10.88.2.254");
        assert_eq!(v["ipam_options"]["driver"], "host-local");
        assert_eq!(v["dns_enabled"], false);
    }
}
