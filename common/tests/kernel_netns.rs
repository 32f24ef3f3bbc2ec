//! Kernel-facing tests of `common::kernel::wireguard`, `common::kernel::routing` and `common::kernel::overlay`,
//! entirely inside network namespaces created for each test (`lmwgtest-<pid>-<tag>a` / `b`, joined by a veth pair
//! created inside them). Runs only as root and when `LM_LAB_SKIP` is unset; otherwise its
//! tests are reported as ignored, and it says why.
//!
//! Each namespace is entered by a dedicated thread (`setns` on `/run/netns/NAME`) that then
//! builds its own current-thread tokio runtime, so every netlink socket, TUN device and
//! `wireguard-go` process it creates lives in that namespace. The root namespace is never
//! touched. A guard deletes the namespaces, the sockets and the `wireguard-go` processes even
//! when an assertion fails.

use std::{
    fs,
    future::Future,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::kernel::{
    overlay::TunnelEnd,
    routing::{Route, Routing},
    wireguard::{self, KeyPair, TunnelSpec},
};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod support;

fn main() {
    support::run_tests(
        support::skip_reason(),
        &[
            (
                "wireguard_and_routing_in_netns",
                wireguard_and_routing_in_netns,
            ),
            (
                "tunnels_whose_peers_suggest_the_same_slot_get_their_own",
                tunnels_whose_peers_suggest_the_same_slot_get_their_own,
            ),
        ],
    )
}

const VETH_A: &str = "lmv-a";
const VETH_B: &str = "lmv-b";
const LAN_A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const LAN_B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const TUN_A: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const TUN_B: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const PORT_A: u16 = 51820;
const PORT_B: u16 = 51821;
const TABLE: u32 = 7800;
/// When both ends send their first handshake initiation at the same moment (both have an
/// endpoint and a persistent keepalive, configured within milliseconds of each other), the
/// initiations cross, both responses are rejected ("Received invalid response message") and
/// WireGuard retries only after REKEY_TIMEOUT (5 s). TCP's SYN retransmission at 7 s then gets
/// through, so allow well over that.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const PRIORITY: u32 = 7800;

/// The tests run one at a time: each spawns and reaps wireguard-go daemons, and timing
/// assertions about them are only meaningful without a neighbour doing the same.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `f` on a fresh thread inside network namespace `ns`, with its own current-thread
/// runtime.
fn run_in<T, Fut>(ns: &str, f: impl FnOnce() -> Fut + Send) -> T
where
    T: Send,
    Fut: Future<Output = T>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn enter_netns(ns: &str) {
    let f = fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    // Affects only this thread.
    setns(&f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {ns}: {e}"));
}

/// Pid of the process holding `/var/run/wireguard/<iface>.sock`, looked up by command line.
fn wireguard_go_pids(ifaces: &[String]) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_wg = args.first().is_some_and(|a| a.ends_with("wireguard-go"));
        if is_wg && args.iter().skip(1).any(|a| ifaces.contains(a)) {
            pids.push(pid);
        }
    }
    pids
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(false)
}

struct Lab {
    ns_a: String,
    ns_b: String,
    if_a: String,
    if_b: String,
    /// Tunnels a test made through `overlay`, named after their peers.
    more_ifaces: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Lab {
    /// `tag` (one letter) keeps the names of tests that run at the same time apart.
    fn new(tag: char) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            ns_a: format!("lmwgtest-{pid}-{tag}a"),
            ns_b: format!("lmwgtest-{pid}-{tag}b"),
            if_a: format!("lmwg-{tag}{pid:x}a"),
            if_b: format!("lmwg-{tag}{pid:x}b"),
            more_ifaces: Vec::new(),
            dirs: vec![
                std::env::temp_dir().join(format!("lmwgtest-{pid}-{tag}a")),
                std::env::temp_dir().join(format!("lmwgtest-{pid}-{tag}b")),
            ],
        };
        // `lab` exists before anything is created: if a command below panics, unwinding drops
        // it and its Drop cleans up what was made.
        ip(&["netns", "add", &lab.ns_a]);
        ip(&["netns", "add", &lab.ns_b]);
        // The veth pair is created inside A with its peer placed directly in B.
        ip(&[
            "-n", &lab.ns_a, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B,
            "netns", &lab.ns_b,
        ]);
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let if_x = format!("{}x", &self.if_a[..self.if_a.len() - 1]);
        let mut ifaces = vec![self.if_a.clone(), self.if_b.clone(), if_x];
        ifaces.extend(self.more_ifaces.iter().cloned());
        let pids: Vec<i32> = wireguard_go_pids(&ifaces)
            .into_iter()
            .filter(|p| alive(*p))
            .collect();
        for &pid in &pids {
            eprintln!("cleanup: SIGTERM wireguard-go {pid}");
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        // A daemon keeps its namespace alive through its TUN fd even after `ip netns del`,
        // so make sure they are gone.
        let deadline = Instant::now() + Duration::from_secs(3);
        while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            // Polls for the daemons to go.
            std::thread::sleep(Duration::from_millis(20));
        }
        for &pid in pids.iter().filter(|p| alive(**p)) {
            eprintln!("cleanup: SIGKILL wireguard-go {pid}");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for iface in &ifaces {
            let _ = fs::remove_file(format!("/var/run/wireguard/{iface}.sock"));
        }
        for ns in [&self.ns_a, &self.ns_b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for dir in &self.dirs {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

fn spec(
    iface: &str,
    keys: &KeyPair,
    port: u16,
    peer: &KeyPair,
    endpoint: SocketAddr,
) -> TunnelSpec {
    let peer_tun = if port == PORT_A { TUN_B } else { TUN_A };
    TunnelSpec {
        interface: iface.to_string(),
        private_key: keys.private_key().clone(),
        listen_port: port,
        peer_public_key: peer.public_base64(),
        peer_endpoint: Some(endpoint),
        allowed_ips: vec![(IpAddr::V4(peer_tun), 32)],
        keepalive: Some(25),
    }
}

/// Socket-owner pid of a userspace interface (None for the kernel backend).
fn daemon_pid(iface: &str) -> Option<i32> {
    let pids = wireguard_go_pids(&[iface.to_string()]);
    pids.into_iter().find(|p| alive(*p))
}

/// Echo one message over TCP from namespace `from` to `to_addr` served in namespace `to`.
fn tcp_roundtrip(
    lab_to: &str,
    lab_from: &str,
    to_addr: Ipv4Addr,
    msg: &[u8],
) -> std::io::Result<Duration> {
    let listener: TcpListener = run_in(lab_to, || async move {
        TcpListener::bind((to_addr, 0)).expect("bind in target namespace")
    });
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).ok();
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        s.write_all(&buf[..n])?;
        Ok::<_, std::io::Error>(())
    });
    let started = Instant::now();
    let result = run_in(lab_from, || async move {
        let addr = SocketAddr::from((to_addr, port));
        let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        s.write_all(msg)?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf)?;
        assert_eq!(buf, msg);
        Ok::<_, std::io::Error>(started.elapsed())
    });
    if let Ok(rtt) = &result {
        eprintln!(
            "TCP {:?} {lab_from} -> {to_addr}: {rtt:?}",
            String::from_utf8_lossy(msg)
        );
        server.join().expect("server thread")?;
    } else {
        for ns in [lab_from, lab_to] {
            for cmd in [
                &["wg", "show"][..],
                &["ss", "-uanp"][..],
                &["ip", "addr"][..],
                &["ip", "route"][..],
            ] {
                let out = Command::new("ip")
                    .args(["netns", "exec", ns])
                    .args(cmd)
                    .output()
                    .unwrap();
                eprintln!(
                    "[{ns}] {}:\n{}{}",
                    cmd.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    // On failure the server thread stays blocked in accept(); its listener dies with the
    // process (or with the namespace).
    result
}

fn wireguard_and_routing_in_netns() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new('t');
    let (ns_a, ns_b) = (lab.ns_a.clone(), lab.ns_b.clone());
    let (if_a, if_b) = (lab.if_a.clone(), lab.if_b.clone());
    eprintln!("backend: {}", wireguard::backend());

    let keys_a = KeyPair::load_or_create(&lab.dirs[0]).unwrap();
    let keys_b = KeyPair::load_or_create(&lab.dirs[1]).unwrap();
    let spec_a = spec(&if_a, &keys_a, PORT_A, &keys_b, (LAN_B, PORT_B).into());
    let spec_b = spec(&if_b, &keys_b, PORT_B, &keys_a, (LAN_A, PORT_A).into());

    // --- LAN addresses first (as on real hosts), then the tunnels, through the module.
    for (ns, veth, lan) in [(&ns_a, VETH_A, LAN_A), (&ns_b, VETH_B, LAN_B)] {
        run_in(ns, || async move {
            let r = Routing::new().unwrap();
            r.set_link_up("lo").await.unwrap();
            r.add_address(veth, IpAddr::V4(lan), 24).await.unwrap();
            r.add_address(veth, IpAddr::V4(lan), 24).await.unwrap(); // idempotent
            r.set_link_up(veth).await.unwrap();
        });
    }
    for (ns, s, tun) in [(&ns_a, &spec_a, TUN_A), (&ns_b, &spec_b, TUN_B)] {
        let elapsed = run_in(ns, || async move {
            let r = Routing::new().unwrap();
            let t = Instant::now();
            wireguard::ensure_tunnel(s).await.unwrap();
            let elapsed = t.elapsed();
            r.add_address(&s.interface, IpAddr::V4(tun), 30)
                .await
                .unwrap();
            // (wireguard-go's TUN also gets an IPv6 link-local address.)
            let addrs = r.addresses(&s.interface).await.unwrap();
            assert!(addrs.contains(&(IpAddr::V4(tun), 30)), "{addrs:?}");
            let link = r.link(&s.interface).await.unwrap().expect("tunnel link");
            assert!(link.up, "tunnel link up");
            assert_eq!(link.mtu, Some(wireguard::TUNNEL_MTU));
            assert_eq!(wireguard::list_tunnels(), vec![s.interface.clone()]);
            elapsed
        });
        eprintln!("ensure_tunnel (create) in {ns}: {elapsed:?}");
    }
    let show = ip_out(&["-n", &ns_a, "-d", "link", "show", &if_a]);
    eprintln!("{show}");
    assert!(show.contains("mtu 1420"), "{show}");

    // --- Traffic over the tunnel addresses.
    let rtt =
        tcp_roundtrip(&ns_b, &ns_a, TUN_B, b"hello over wireguard").expect("tcp A->B over tunnel");
    eprintln!("first TCP round trip over the tunnel (incl. handshake): {rtt:?}");
    tcp_roundtrip(&ns_a, &ns_b, TUN_A, b"and back").expect("tcp B->A over tunnel");

    let info_a = run_in(&ns_a, || async {
        wireguard::tunnel_info(&if_a).await.unwrap()
    });
    assert_eq!(
        info_a.public_key.as_deref(),
        Some(keys_a.public_base64().as_str())
    );
    assert_eq!(info_a.listen_port, Some(PORT_A));
    assert_eq!(info_a.peers.len(), 1);
    let handshake = info_a.peers[0].last_handshake;
    assert!(handshake.is_some(), "handshake happened: {info_a:?}");

    // --- Idempotence: same spec again changes nothing (same daemon, same link, same session).
    let pid_before = daemon_pid(&if_a);
    let (idx_before, idx_after, elapsed) = run_in(&ns_a, || async {
        let r = Routing::new().unwrap();
        let before = r.link_index(&if_a).await.unwrap();
        let t = Instant::now();
        wireguard::ensure_tunnel(&spec_a).await.unwrap();
        let elapsed = t.elapsed();
        (before, r.link_index(&if_a).await.unwrap(), elapsed)
    });
    eprintln!("ensure_tunnel (no-op) in {ns_a}: {elapsed:?}");
    assert_eq!(idx_before, idx_after);
    assert_eq!(daemon_pid(&if_a), pid_before);
    let info_again = run_in(&ns_a, || async {
        wireguard::tunnel_info(&if_a).await.unwrap()
    });
    assert_eq!(
        info_again.peers[0].last_handshake, handshake,
        "session kept"
    );
    assert_eq!(info_again.peers[0].allowed_ips, info_a.peers[0].allowed_ips);

    // --- set_allowed_ips: replace the peer's list, session kept.
    let extra: (IpAddr, u8) = (IpAddr::V4(Ipv4Addr::new(10, 97, 0, 5)), 32);
    run_in(&ns_a, || async {
        wireguard::set_allowed_ips(
            &if_a,
            &keys_b.public_base64(),
            &[(IpAddr::V4(TUN_B), 32), extra],
        )
        .await
        .unwrap();
        let info = wireguard::tunnel_info(&if_a).await.unwrap();
        let mut ips = info.peers[0].allowed_ips.clone();
        ips.sort();
        assert_eq!(ips, vec![extra, (IpAddr::V4(TUN_B), 32)]);
        assert_eq!(info.peers[0].last_handshake, handshake);
        // Unknown peer: refused, not created.
        let stranger = KeyPair::generate();
        assert!(
            wireguard::set_allowed_ips(&if_a, &stranger.public_base64(), &[extra])
                .await
                .is_err()
        );
        // ensure_tunnel brings the list back to the spec.
        wireguard::ensure_tunnel(&spec_a).await.unwrap();
        let info = wireguard::tunnel_info(&if_a).await.unwrap();
        assert_eq!(info.peers[0].allowed_ips, vec![(IpAddr::V4(TUN_B), 32)]);
    });

    // --- A different peer reconfigures in place; going back restores the tunnel.
    run_in(&ns_a, || async {
        let other = KeyPair::generate();
        let mut s = spec_a.clone();
        s.peer_public_key = other.public_base64();
        wireguard::ensure_tunnel(&s).await.unwrap();
        let info = wireguard::tunnel_info(&if_a).await.unwrap();
        assert_eq!(info.peers.len(), 1);
        assert_eq!(info.peers[0].public_key, other.public_base64());
        wireguard::ensure_tunnel(&spec_a).await.unwrap();
        let info = wireguard::tunnel_info(&if_a).await.unwrap();
        assert_eq!(info.peers.len(), 1);
        assert_eq!(info.peers[0].public_key, keys_b.public_base64());
    });
    assert_eq!(
        daemon_pid(&if_a),
        pid_before,
        "reconfiguring kept the daemon"
    );
    tcp_roundtrip(&ns_b, &ns_a, TUN_B, b"after peer change").expect("tcp after peer change");

    // --- A half-made interface (link down) is rebuilt.
    ip(&["-n", &ns_a, "link", "set", &if_a, "down"]);
    let elapsed = run_in(&ns_a, || async {
        let t = Instant::now();
        wireguard::ensure_tunnel(&spec_a).await.unwrap();
        let elapsed = t.elapsed();
        let r = Routing::new().unwrap();
        assert!(r.link(&if_a).await.unwrap().unwrap().up);
        // The rebuilt link lost its address: add it back (the agent does this after
        // ensure_tunnel).
        r.add_address(&if_a, IpAddr::V4(TUN_A), 30).await.unwrap();
        elapsed
    });
    eprintln!("ensure_tunnel (rebuild of a downed link) in {ns_a}: {elapsed:?}");
    if let (Some(before), Some(after)) = (pid_before, daemon_pid(&if_a)) {
        assert_ne!(before, after, "userspace daemon restarted");
        assert!(!alive(before), "old daemon gone");
    }
    tcp_roundtrip(&ns_b, &ns_a, TUN_B, b"after rebuild").expect("tcp after rebuild");

    // --- Routes: blackhole -> device replace, in an agent table and in main.
    run_in(&ns_a, || async {
        let r = Routing::new().unwrap();
        let dst = Ipv4Addr::new(10, 98, 0, 77);
        r.replace_route(&Route::blackhole_v4(dst, 32, TABLE))
            .await
            .unwrap();
        let routes = r.routes_in_table(TABLE).await.unwrap();
        assert_eq!(routes, vec![Route::blackhole_v4(dst, 32, TABLE)]);
        r.replace_route(&Route::device_v4(dst, 32, TABLE, if_a.clone()))
            .await
            .unwrap();
        let routes = r.routes_in_table(TABLE).await.unwrap();
        assert_eq!(routes, vec![Route::device_v4(dst, 32, TABLE, if_a.clone())]);
        r.replace_route(&Route::device_v4(dst, 32, TABLE, if_a.clone()))
            .await
            .unwrap();
        assert_eq!(r.routes_in_table(TABLE).await.unwrap().len(), 1);
        assert!(r.delete_route(IpAddr::V4(dst), 32, TABLE).await.unwrap());
        assert!(!r.delete_route(IpAddr::V4(dst), 32, TABLE).await.unwrap());
        assert!(r.routes_in_table(TABLE).await.unwrap().is_empty());
        // Tables outside the agent's range are refused.
        let err = r
            .replace_route(&Route::blackhole_v4(dst, 32, 100))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("table 100"), "{err}");
        // A device route to a missing link names it.
        let err = r
            .replace_route(&Route::device_v4(dst, 32, TABLE, "lmwg-nothere"))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("lmwg-nothere"), "{err:#}");
        // Main table: blackhole the peer's tunnel address.
        r.replace_route(&Route::blackhole_v4(TUN_B, 32, 254))
            .await
            .unwrap();
        assert!(r
            .routes_in_table(254)
            .await
            .unwrap()
            .contains(&Route::blackhole_v4(TUN_B, 32, 254)));
    });
    assert!(
        tcp_roundtrip(&ns_b, &ns_a, TUN_B, b"blackholed").is_err(),
        "blackhole route drops traffic"
    );
    run_in(&ns_a, || async {
        let r = Routing::new().unwrap();
        r.replace_route(&Route::device_v4(TUN_B, 32, 254, if_a.clone()))
            .await
            .unwrap();
        let main = r.routes_in_table(254).await.unwrap();
        assert!(
            main.contains(&Route::device_v4(TUN_B, 32, 254, if_a.clone())),
            "{main:?}"
        );
        assert!(!main.contains(&Route::blackhole_v4(TUN_B, 32, 254)));
    });
    tcp_roundtrip(&ns_b, &ns_a, TUN_B, b"unblackholed").expect("tcp after blackhole->device");
    run_in(&ns_a, || async {
        let r = Routing::new().unwrap();
        assert!(r.delete_route(IpAddr::V4(TUN_B), 32, 254).await.unwrap());
    });

    // --- fwmark rules.
    run_in(&ns_a, || async {
        let r = Routing::new().unwrap();
        let (mark, mask) = (0x0010_0000, 0x00f0_0000);
        r.add_fwmark_rule(mark, mask, TABLE, PRIORITY)
            .await
            .unwrap();
        r.add_fwmark_rule(mark, mask, TABLE, PRIORITY)
            .await
            .unwrap(); // idempotent
        let ours: Vec<_> = r
            .rules()
            .await
            .unwrap()
            .into_iter()
            .filter(|rule| rule.is_fwmark_rule(mark, mask, TABLE, PRIORITY))
            .collect();
        assert_eq!(ours.len(), 1, "{ours:?}");
        assert_eq!(r.agent_rules().await.unwrap().len(), 1);
        assert!(r.add_fwmark_rule(mark, mask, 254, PRIORITY).await.is_err());
        assert!(r.add_fwmark_rule(mark, mask, TABLE, 100).await.is_err());
        assert!(r
            .delete_fwmark_rule(mark, mask, TABLE, PRIORITY)
            .await
            .unwrap());
        assert!(!r
            .delete_fwmark_rule(mark, mask, TABLE, PRIORITY)
            .await
            .unwrap());
        assert!(r.agent_rules().await.unwrap().is_empty());
    });
    let rules = ip_out(&["-n", &ns_a, "rule", "show"]);
    assert!(!rules.contains("7800"), "{rules}");

    // --- A half-made userspace interface (daemon running, no key, link down) is rebuilt.
    if wireguard::backend() == wireguard::TunnelBackend::Userspace {
        run_in(&ns_b, || async {
            wireguard::remove_tunnel(&if_b).await.unwrap()
        });
        let out = Command::new("ip")
            .args(["netns", "exec", &ns_b, "wireguard-go", &if_b])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let bare = daemon_pid(&if_b).expect("bare wireguard-go running");
        let elapsed = run_in(&ns_b, || async {
            let t = Instant::now();
            wireguard::ensure_tunnel(&spec_b).await.unwrap();
            let elapsed = t.elapsed();
            Routing::new()
                .unwrap()
                .add_address(&if_b, IpAddr::V4(TUN_B), 30)
                .await
                .unwrap();
            elapsed
        });
        eprintln!("ensure_tunnel (rebuild of a keyless interface) in {ns_b}: {elapsed:?}");
        assert!(!alive(bare), "bare daemon replaced");
        tcp_roundtrip(&ns_b, &ns_a, TUN_B, b"after keyless rebuild").expect("tcp after rebuild");
    }

    // --- A busy listen port gives a clear error and leaves nothing behind.
    run_in(&ns_a, || async {
        let other = KeyPair::generate();
        let mut s = spec_a.clone();
        s.interface = format!("{}x", &if_a[..if_a.len() - 1]);
        s.private_key = other.private_key().clone();
        let err = wireguard::ensure_tunnel(&s).await.unwrap_err();
        eprintln!("busy port error: {err:#}");
        assert!(format!("{err:#}").contains(&s.interface), "{err:#}");
        assert!(format!("{err:#}").contains("already in use"), "{err:#}");
        assert_eq!(
            Routing::new()
                .unwrap()
                .link_index(&s.interface)
                .await
                .unwrap(),
            None
        );
        assert!(
            !std::path::Path::new(&format!("/var/run/wireguard/{}.sock", s.interface)).exists()
        );
    });

    // --- Removal: link, socket and daemon gone, idempotent.
    for (ns, iface) in [(&ns_a, &if_a), (&ns_b, &if_b)] {
        let pid = daemon_pid(iface);
        let elapsed = run_in(ns, || async {
            let t = Instant::now();
            wireguard::remove_tunnel(iface).await.unwrap();
            let elapsed = t.elapsed();
            wireguard::remove_tunnel(iface).await.unwrap();
            let r = Routing::new().unwrap();
            assert_eq!(r.link_index(iface).await.unwrap(), None);
            assert!(wireguard::list_tunnels().is_empty());
            elapsed
        });
        eprintln!("remove_tunnel in {ns}: {elapsed:?}");
        assert!(!std::path::Path::new(&format!("/var/run/wireguard/{iface}.sock")).exists());
        if let Some(pid) = pid {
            assert!(!alive(pid), "wireguard-go {pid} stopped");
        }
    }
    drop(lab);
}

/// Two peers whose keys suggest the same slot on this host still get tunnels of their own
/// (listen port, mark, table), and an existing tunnel keeps its slot.
fn tunnels_whose_peers_suggest_the_same_slot_get_their_own() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new('s');
    let ns = lab.ns_a.clone();
    let keys = KeyPair::load_or_create(&lab.dirs[0]).unwrap();
    let ours = keys.public_base64();
    // With no tunnel yet, `to_peer` answers the suggested slot.
    let (b, c) = run_in(&ns, || async {
        let b = KeyPair::generate().public_base64();
        let wanted = TunnelEnd::to_peer(&ours, &b).await.unwrap().listen_port;
        loop {
            let c = KeyPair::generate().public_base64();
            if TunnelEnd::to_peer(&ours, &c).await.unwrap().listen_port == wanted {
                return (b, c);
            }
        }
    });
    lab.more_ifaces = run_in(&ns, || async {
        vec![
            TunnelEnd::to_peer(&ours, &b).await.unwrap().interface,
            TunnelEnd::to_peer(&ours, &c).await.unwrap().interface,
        ]
    });
    run_in(&ns, || async {
        Routing::new().unwrap().set_link_up("lo").await.unwrap();
        let to_b = TunnelEnd::ensure(&keys, &b, None).await.unwrap();
        let to_c = TunnelEnd::ensure(&keys, &c, None).await.unwrap();
        assert_ne!(to_b.listen_port, to_c.listen_port);
        assert_ne!(to_b.mark, to_c.mark);
        assert_ne!(to_b.table, to_c.table);
        assert_eq!(TunnelEnd::ensure(&keys, &b, None).await.unwrap(), to_b);
        assert_eq!(TunnelEnd::to_peer(&ours, &c).await.unwrap(), to_c);
        to_b.tear_down().await.unwrap();
        to_c.tear_down().await.unwrap();
    });
}
