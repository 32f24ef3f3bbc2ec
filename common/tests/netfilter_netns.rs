//! nftables table and conntrack entries, exercised for real inside throw-away network
//! namespaces (`lmnfttest-<pid>-<name>`). Runs only as root with `LM_LAB_SKIP` unset;
//! otherwise its tests are reported as ignored, and it says why.
//!
//! Each test creates its namespace with `ip netns add`, enters it with setns(2) on a
//! dedicated thread (namespaces are per thread; `nft` child processes inherit it), builds a
//! current-thread tokio runtime there, and deletes the namespace afterwards through a Drop
//! guard, also when an assertion fails. Nothing touches the root namespace.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::Command;

use common::kernel::conntrack::{self, Flow, Proto, TCP_STATE_ESTABLISHED};
use common::kernel::nft::{
    Firewall, RuleKind, NAT_PREROUTING_CHAIN, POSTROUTING_CHAIN, PREROUTING_CHAIN,
};
use nix::sched::{setns, CloneFlags};

mod support;

fn main() {
    support::run_tests(
        support::skip_reason(),
        &[
            ("firewall_rules_lifecycle", firewall_rules_lifecycle),
            ("conntrack_create_list_delete", conntrack_create_list_delete),
            ("conntrack_sees_real_traffic", conntrack_sees_real_traffic),
            (
                "tunnel_mark_and_forward_with_traffic",
                tunnel_mark_and_forward_with_traffic,
            ),
            (
                "page_server_guard_lets_only_the_peer_in",
                page_server_guard_lets_only_the_peer_in,
            ),
            (
                "armed_hold_passes_then_holds_in_order",
                armed_hold_passes_then_holds_in_order,
            ),
        ],
    )
}

/// A network namespace that is deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(suffix: &str) -> Netns {
        let name = format!("lmnfttest-{}-{suffix}", std::process::id());
        // A leftover of an earlier run with the same pid: remove it first.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("running ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        Netns { name }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Moves the calling thread into namespace `name` (and checks it left the one it was in).
fn enter(name: &str) {
    let root = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let file = std::fs::File::open(format!("/run/netns/{name}")).expect("opening the netns file");
    setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns: {e}"));
    let now = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    assert_ne!(now, root, "still in the original network namespace");
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("running ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// Runs `body` on a fresh thread inside a fresh namespace, on a current-thread runtime.
/// Panics in `body` are re-raised after the namespace is deleted.
fn in_netns<F, Fut>(suffix: &str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let ns = Netns::new(suffix);
    let name = ns.name.clone();
    let result = std::thread::spawn(move || {
        enter(&name);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a runtime");
        rt.block_on(body());
    })
    .join();
    drop(ns);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `body` on a fresh thread inside a fresh host namespace, joined to a fresh client
/// namespace by a veth: `host_if` here, up, ready to send (see [`wait_until_sending`])
/// and holding `host_address` (with its prefix), and `c0` there, up and without an
/// address. `body` gets the client namespace's name. Panics in `body` are re-raised
/// after both namespaces are deleted.
fn host_and_client<F>(suffix: &str, host_if: &str, host_address: &str, body: F)
where
    F: FnOnce(String) + Send + 'static,
{
    let host = Netns::new(&format!("{suffix}host"));
    let client = Netns::new(&format!("{suffix}client"));
    let (host_name, client_name) = (host.name.clone(), client.name.clone());
    let (host_if, host_address) = (host_if.to_string(), host_address.to_string());
    let result = std::thread::spawn(move || {
        enter(&host_name);
        ip(&["link", "set", "lo", "up"]);
        ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            &client_name,
        ]);
        ip(&["addr", "add", &host_address, "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        // The host end comes up first, without a carrier; it gets one when `c0` comes
        // up, and can send only once the kernel's link watcher has seen that.
        let events = link_events();
        ip(&["-n", &client_name, "link", "set", "c0", "up"]);
        wait_until_sending(&events, &host_if);
        body(client_name);
    })
    .join();
    drop(client);
    drop(host);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A socket that gets the link notifications of the current network namespace.
fn link_events() -> netlink_sys::Socket {
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    const RTMGRP_LINK: u32 = 1;
    let mut socket = Socket::new(NETLINK_ROUTE).expect("opening a netlink socket");
    socket
        .bind(&SocketAddr::new(0, RTMGRP_LINK))
        .expect("joining the link notifications");
    socket
}

/// Waits, on `events` (from [`link_events`], made before the carrier came), until the
/// link `ifname` is announced operationally up. A veth end brought up while its peer is
/// down has its transmit queue started only when its carrier comes, and then not at
/// once: by the kernel's link watcher, a work item that runs later (on a busy machine,
/// after the peer has already sent). Until then every packet it sends is dropped (a
/// `noop` qdisc: QDISC_DROP), an ARP reply too, and the other side asks again only a
/// second later. The link watcher announces the link up (RTM_NEWLINK, operstate UP)
/// after it has started the queue.
fn wait_until_sending(events: &netlink_sys::Socket, ifname: &str) {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use rtnetlink::packet_route::{
        link::{LinkAttribute, State},
        RouteNetlinkMessage,
    };
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = deadline
            .checked_duration_since(std::time::Instant::now())
            .unwrap_or_else(|| panic!("{ifname} not announced up within 10 s"));
        let timeout = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut ready = [PollFd::new(events, PollFlags::IN)];
        if poll(&mut ready, Some(&timeout)).expect("polling the link notifications") == 0 {
            continue;
        }
        let (buffer, _) = events
            .recv_from_full()
            .expect("reading the link notifications");
        let mut at = 0;
        while at < buffer.len() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buffer[at..])
                .expect("a link notification");
            at += message.header.length as usize;
            let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = message.payload
            else {
                continue;
            };
            let (mut name, mut up) = (false, false);
            for attribute in &link.attributes {
                match attribute {
                    LinkAttribute::IfName(n) => name = n == ifname,
                    LinkAttribute::OperState(state) => up = *state == State::Up,
                    _ => {}
                }
            }
            if name && up {
                return;
            }
        }
    }
}

/// Table names in the current namespace, from `nft -j list tables`.
fn tables() -> Vec<(String, String)> {
    let out = Command::new("nft")
        .args(["-j", "list", "tables"])
        .output()
        .expect("running nft");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("table"))
        .map(|t| {
            (
                t["family"].as_str().unwrap().to_owned(),
                t["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn kinds(fw: &Firewall) -> Vec<RuleKind> {
    fw.rules().unwrap().into_iter().map(|r| r.kind).collect()
}

fn firewall_rules_lifecycle() {
    in_netns("fw", || async {
        assert!(!Firewall::table_exists().unwrap());
        // Removing what does not exist is fine.
        Firewall::remove_table().unwrap();

        let fw = Firewall::ensure().unwrap();
        let fw2 = Firewall::ensure().unwrap(); // idempotent
        assert!(Firewall::table_exists().unwrap());
        assert!(tables().contains(&("inet".into(), "live_migrate".into())));
        assert!(fw.rules().unwrap().is_empty());

        fw.mark_tunnel("wg-lm0", 0x7801).unwrap();
        fw2.mark_tunnel("wg-lm0", 0x7801).unwrap(); // no duplicate
        fw.mark_tunnel("wg-lm1", 0x7802).unwrap();
        let rules = fw.rules().unwrap();
        assert_eq!(rules.len(), 6, "{rules:?}");
        assert!(rules.iter().all(|r| r.chain
            == if matches!(r.kind, RuleKind::DropClash { .. }) {
                POSTROUTING_CHAIN
            } else {
                PREROUTING_CHAIN
            }));
        let k = kinds(&fw);
        assert!(k.contains(&RuleKind::MarkTunnel {
            ifname: "wg-lm0".into(),
            mark: 0x7801
        }));
        assert!(k.contains(&RuleKind::RestoreMark {
            ifname: "wg-lm1".into(),
            mark: 0x7802
        }));

        // Changing the mark of a tunnel replaces its rules.
        fw.mark_tunnel("wg-lm0", 0x7803).unwrap();
        let k = kinds(&fw);
        assert_eq!(k.len(), 6, "{k:?}");
        assert!(k.contains(&RuleKind::MarkTunnel {
            ifname: "wg-lm0".into(),
            mark: 0x7803
        }));
        assert!(!k.contains(&RuleKind::MarkTunnel {
            ifname: "wg-lm0".into(),
            mark: 0x7801
        }));

        fw.forward_port(Proto::Tcp, 8080, Ipv4Addr::new(10, 88, 0, 5), 80)
            .unwrap();
        fw.forward_port(Proto::Tcp, 8080, Ipv4Addr::new(10, 88, 0, 5), 80)
            .unwrap();
        fw.forward_port(Proto::Udp, 8080, Ipv4Addr::new(10, 88, 0, 6), 53)
            .unwrap();
        fw.forward_port(Proto::Udp, 8080, Ipv4Addr::new(10, 88, 0, 7), 53)
            .unwrap(); // replaces
        let fwd: Vec<_> = fw
            .rules()
            .unwrap()
            .into_iter()
            .filter(|r| r.chain == NAT_PREROUTING_CHAIN)
            .map(|r| r.kind)
            .collect();
        assert_eq!(
            fwd,
            vec![
                RuleKind::ForwardPort {
                    proto: Proto::Tcp,
                    host_port: 8080,
                    container: "10.88.0.5:80".parse().unwrap()
                },
                RuleKind::ForwardPort {
                    proto: Proto::Udp,
                    host_port: 8080,
                    container: "10.88.0.7:53".parse().unwrap()
                },
            ]
        );

        // nft itself shows the rules as intended.
        let text = listed_table();
        assert!(text.contains("dnat ip to 10.88.0.5:80"), "{text}");
        assert!(text.contains("ct mark set 0x00007803"), "{text}");
        assert!(text.contains("meta mark set ct mark"), "{text}");
        assert!(text.contains("ct state new ct status snat drop"), "{text}");

        let flow = |port| {
            (
                Proto::Tcp,
                "10.77.0.100:40000".parse().unwrap(),
                SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 5), port),
            )
        };
        fw.untrack_returning(&[flow(5000)], 30).unwrap();
        fw.untrack_returning(&[flow(5001)], 30).unwrap(); // one rule
        let text = listed_table();
        assert!(
            text.contains(r#"iifname "lmwg-*" meta l4proto . ip saddr . th sport . ip daddr . th dport @returning_flows notrack"#),
            "{text}"
        );
        assert!(
            text.contains("tcp . 10.77.0.100 . 40000 . 10.88.0.5 . 5000 timeout 30s"),
            "{text}"
        );
        assert_eq!(text.matches("@returning_flows").count(), 1, "{text}");

        fw.unforward_port(Proto::Tcp, 8080).unwrap();
        fw.unforward_port(Proto::Tcp, 8080).unwrap(); // no-op
        fw.unmark_tunnel("wg-lm0").unwrap();
        fw.unmark_tunnel("wg-lm0").unwrap(); // no-op
        let k = kinds(&fw);
        assert_eq!(k.len(), 5, "{k:?}");
        assert!(k.iter().all(|k| !matches!(k,
            RuleKind::MarkTunnel { ifname, .. } | RuleKind::RestoreMark { ifname, .. }
                | RuleKind::DropClash { ifname } if ifname == "wg-lm0")));

        fw.remove_all().unwrap();
        fw.remove_all().unwrap(); // idempotent
        assert!(!Firewall::table_exists().unwrap());
        assert!(tables().is_empty(), "{:?}", tables());
        assert!(fw.rules().unwrap().is_empty());
    });
}

fn conntrack_create_list_delete() {
    in_netns("ct", || async {
        let flow = Flow::tcp(
            "10.1.1.1:1234".parse().unwrap(),
            "10.2.2.2:80".parse().unwrap(),
        )
        .with_mark(0x7801);
        let udp = Flow::udp(
            "10.1.1.1:5000".parse().unwrap(),
            "10.2.2.2:53".parse().unwrap(),
        )
        .with_mark(0x7801);
        assert!(conntrack::create(&flow).await.unwrap());
        // EEXIST: the entry is there, but not made by this call.
        assert!(!conntrack::create(&flow).await.unwrap());
        assert!(conntrack::create(&udp).await.unwrap());

        let all = conntrack::list().await.unwrap();
        let found = all
            .iter()
            .find(|f| f.orig == flow.orig)
            .unwrap_or_else(|| panic!("entry not listed: {all:?}"));
        assert_eq!(found.proto, Proto::Tcp);
        assert_eq!(found.reply, flow.reply);
        assert_eq!(found.mark, 0x7801);
        assert_eq!(found.tcp_state, Some(TCP_STATE_ESTABLISHED));
        let t = found.timeout.unwrap();
        assert!(t > 3500 && t <= 3600, "timeout {t}");
        let u = all.iter().find(|f| f.orig == udp.orig).expect("udp entry");
        assert_eq!(u.proto, Proto::Udp);
        assert_eq!(u.tcp_state, None);
        assert!(u.timeout.unwrap() <= 120);

        let ip: IpAddr = "10.2.2.2".parse().unwrap();
        assert_eq!(conntrack::involving(&all, ip).len(), 2);
        assert!(conntrack::involving(&all, "10.9.9.9".parse::<IpAddr>().unwrap()).is_empty());

        conntrack::delete(&flow).await.unwrap();
        conntrack::delete(&flow).await.unwrap(); // ENOENT is fine
        let all = conntrack::list().await.unwrap();
        assert!(all.iter().all(|f| f.orig != flow.orig), "{all:?}");
        assert!(all.iter().any(|f| f.orig == udp.orig));

        // delete_marked leaves other marks alone.
        let other = Flow::udp(
            "10.1.1.1:5001".parse().unwrap(),
            "10.2.2.2:53".parse().unwrap(),
        )
        .with_mark(0x42);
        assert!(conntrack::create(&other).await.unwrap());
        assert!(conntrack::delete_marked(0).await.is_err());
        assert_eq!(conntrack::delete_marked(0x7801).await.unwrap(), 1);
        let all = conntrack::list().await.unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].orig, other.orig);
        conntrack::delete(&other).await.unwrap();
        assert!(conntrack::list().await.unwrap().is_empty());
    });
}

fn conntrack_sees_real_traffic() {
    in_netns("traffic", || async {
        let st = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(st.success());
        // Conntrack only tracks packets in a namespace once something uses it: a rule
        // with a ct expression (our mark rules) registers the conntrack hooks.
        let fw = Firewall::ensure().unwrap();
        fw.mark_tunnel("wg-lm0", 0x7801).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        let client_addr = client.local_addr().unwrap();
        assert_eq!(peer, client_addr);

        let flows = conntrack::list().await.unwrap();
        let server_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let f = flows
            .iter()
            .find(|f| f.orig.src == client_addr && f.orig.dst == server_addr)
            .unwrap_or_else(|| panic!("connection not tracked: {flows:?}"));
        assert_eq!(f.proto, Proto::Tcp);
        assert_eq!(f.reply.src, server_addr);
        assert_eq!(f.tcp_state, Some(TCP_STATE_ESTABLISHED));
        assert_eq!(f.mark, 0, "lo is not the tunnel");
        assert!(!f.is_nat());
        let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
        assert!(!conntrack::involving(&flows, lo).is_empty());

        fw.remove_all().unwrap();
    });
}

/// Two namespaces joined by a veth whose host end is called like a tunnel: a connection
/// from the client to a forwarded port is DNATed and its conntrack entry carries the
/// tunnel's mark.
fn tunnel_mark_and_forward_with_traffic() {
    host_and_client("", "wg-lm0", "10.9.0.1/24", |client_name| {
        let fw = Firewall::ensure().unwrap();
        fw.mark_tunnel("wg-lm0", 0x7801).unwrap();
        fw.forward_port(Proto::Tcp, 8080, Ipv4Addr::new(10, 9, 0, 1), 9000)
            .unwrap();
        let listener = TcpListener::bind("10.9.0.1:9000").unwrap();

        let client_thread = std::thread::spawn(move || {
            enter(&client_name);
            ip(&["link", "set", "lo", "up"]);
            ip(&["addr", "add", "10.9.0.2/24", "dev", "c0"]);
            let s = TcpStream::connect_timeout(
                &"10.9.0.1:8080".parse().unwrap(),
                std::time::Duration::from_secs(5),
            )
            .expect("connecting to the forwarded port");
            let local = s.local_addr().unwrap();
            (s, local)
        });
        let (_conn, peer) = listener.accept().unwrap();
        let (_client_conn, client_addr) = client_thread.join().unwrap();
        assert_eq!(peer, client_addr);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let flows = rt.block_on(conntrack::list()).unwrap();
        let f = flows
            .iter()
            .find(|f| f.orig.src == client_addr)
            .unwrap_or_else(|| panic!("connection not tracked: {flows:?}"));
        assert_eq!(f.orig.dst, "10.9.0.1:8080".parse().unwrap());
        assert_eq!(f.reply.src, "10.9.0.1:9000".parse().unwrap());
        assert!(f.is_nat());
        assert_eq!(f.mark, 0x7801, "entered through the tunnel: {f}");
        let plain = f.without_nat();
        assert_eq!(plain.orig.dst, "10.9.0.1:9000".parse().unwrap());
        assert_eq!(conntrack::involving(&flows, client_addr.ip()).len(), 1);
        fw.remove_all().unwrap();
    });
}

/// The guard of a page server's port: a connection from the peer gets through, one from
/// another address of the same network is dropped (it times out, it is not refused), and
/// once the guard goes both get through.
fn page_server_guard_lets_only_the_peer_in() {
    host_and_client("guard", "lmg0", "10.9.1.1/24", |client_name| {
        let server: SocketAddrV4 = "10.9.1.1:9100".parse().unwrap();
        // Never accepted: the kernel completes the handshakes.
        let _listener = TcpListener::bind(server).unwrap();
        let (peer, stranger) = (Ipv4Addr::new(10, 9, 1, 2), Ipv4Addr::new(10, 9, 1, 3));
        let attempts = move |first: bool| {
            let client_name = client_name.clone();
            std::thread::spawn(move || {
                enter(&client_name);
                if first {
                    ip(&["link", "set", "lo", "up"]);
                    ip(&["addr", "add", "10.9.1.2/24", "dev", "c0"]);
                    ip(&["addr", "add", "10.9.1.3/24", "dev", "c0"]);
                }
                (connect_from(peer, server), connect_from(stranger, server))
            })
            .join()
            .unwrap()
        };
        let fw = Firewall::ensure().unwrap();
        fw.guard_pages(server, peer).unwrap();
        let (from_peer, from_stranger) = attempts(true);
        assert!(from_peer.is_ok(), "the peer was kept out: {from_peer:?}");
        assert_eq!(
            from_stranger.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::TimedOut),
            "a stranger got through, or was refused rather than dropped"
        );
        fw.unguard_pages(server).unwrap();
        fw.unguard_pages(server).unwrap(); // no-op
        assert!(fw.rules().unwrap().is_empty());
        let (from_peer, from_stranger) = attempts(false);
        assert!(
            from_peer.is_ok() && from_stranger.is_ok(),
            "unguarded: {from_peer:?} {from_stranger:?}"
        );
        fw.remove_all().unwrap();
    });
}

/// An armed packet hold lets datagrams through as they come and counts none; held back,
/// it keeps them until the release, which lets them through in order and counts them.
fn armed_hold_passes_then_holds_in_order() {
    use common::kernel::hold;
    host_and_client("hold", "lmh0", "10.9.2.1/24", |client_name| {
        let address = Ipv4Addr::new(10, 9, 2, 1);
        let server = SocketAddrV4::new(address, 9200);
        let send = move |first: bool, messages: &'static [&'static str]| {
            let client_name = client_name.clone();
            std::thread::spawn(move || {
                enter(&client_name);
                if first {
                    ip(&["addr", "add", "10.9.2.2/24", "dev", "c0"]);
                }
                let socket = std::net::UdpSocket::bind("10.9.2.2:0").unwrap();
                for message in messages {
                    socket.send_to(message.as_bytes(), server).unwrap();
                }
            })
            .join()
            .unwrap()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a runtime");
        rt.block_on(async move {
            let receiver = tokio::net::UdpSocket::bind(server).await.unwrap();
            let receive = |within: std::time::Duration| {
                let receiver = &receiver;
                async move {
                    let mut buffer = [0; 16];
                    let (len, _) = tokio::time::timeout(within, receiver.recv_from(&mut buffer))
                        .await
                        .ok()?
                        .ok()?;
                    Some(String::from_utf8_lossy(&buffer[..len]).into_owned())
                }
            };
            let second = std::time::Duration::from_secs(1);
            hold::arm(address, 100, None).await.unwrap();
            send(true, &["p0", "p1"]);
            assert_eq!(
                receive(second).await.as_deref(),
                Some("p0"),
                "armed, not passing"
            );
            assert_eq!(receive(second).await.as_deref(), Some("p1"));

            assert!(hold::hold_back(address).await);
            assert!(
                !hold::hold_back(Ipv4Addr::new(10, 9, 2, 9)).await,
                "no hold there"
            );
            send(false, &["h0", "h1", "h2"]);
            // Absence can only be waited for: a held datagram would have come by now.
            assert_eq!(
                receive(std::time::Duration::from_millis(300)).await,
                None,
                "not held"
            );

            let report = hold::release(address).await.unwrap().expect("a live hold");
            assert_eq!(
                (report.held, report.dropped),
                (3, 0),
                "passed packets counted as held"
            );
            for expected in ["h0", "h1", "h2"] {
                assert_eq!(receive(second).await.as_deref(), Some(expected));
            }
            let rules = Command::new("nft")
                .args(["list", "ruleset"])
                .output()
                .unwrap();
            let rules = String::from_utf8_lossy(&rules.stdout);
            assert!(!rules.contains("lm:hold"), "hold rule left:\n{rules}");
        });
    });
}

/// A TCP connection to `to` from the local address `source`, given a second.
fn connect_from(source: Ipv4Addr, to: SocketAddrV4) -> std::io::Result<()> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    use std::os::fd::AsRawFd;
    let socket = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(
        socket.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(source, 0)),
    )?;
    match connect(socket.as_raw_fd(), &SockaddrIn::from(to)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from(socket);
    let mut ready = [PollFd::new(&stream, PollFlags::OUT)];
    let second = Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    if poll(&mut ready, Some(&second))? == 0 {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `nft list table inet live_migrate`, as nft prints it.
fn listed_table() -> String {
    let out = Command::new("nft")
        .args(["list", "table", "inet", "live_migrate"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    text
}
