//! What the kernel shows of sockets and descriptors, through procfs: the TCP sockets of
//! this network namespace, which process holds one, the connections a process holds, and
//! a duplicate of another process's descriptor.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;

use anyhow::{anyhow, Context, Result};

/// One line of `/proc/net/tcp`.
pub(super) struct TcpSocket {
    pub(super) local: SocketAddrV4,
    pub(super) remote: SocketAddrV4,
    pub(super) listening: bool,
    pub(super) inode: u64,
}

/// The IPv4 TCP sockets of this network namespace, with the inode that finds each one's
/// holder ([`socket_holder`]). It walks the kernel's whole table of connections: not for
/// polling ([`connection_held`]).
pub(super) fn tcp_sockets() -> Result<Vec<TcpSocket>> {
    let text = std::fs::read_to_string("/proc/net/tcp").context("read /proc/net/tcp")?;
    Ok(text.lines().skip(1).filter_map(parse_tcp_line).collect())
}

pub(super) fn parse_tcp_line(line: &str) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let address = |field: &str| -> Option<SocketAddrV4> {
        let (ip, port) = field.split_once(':')?;
        // The kernel prints the address as a native-endian number of network-order bytes.
        let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
        Some(SocketAddrV4::new(ip, u16::from_str_radix(port, 16).ok()?))
    };
    Some(TcpSocket {
        local: address(fields.get(1)?)?,
        remote: address(fields.get(2)?)?,
        listening: *fields.get(3)? == "0A",
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// The descriptors of process `pid` whose link (`socket:[inode]`, ...) is `wanted`.
pub(super) fn descriptors(pid: i32, wanted: impl Fn(&str) -> bool) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|link| link.to_str().is_some_and(&wanted))
        })
        .filter_map(|fd| fd.file_name().to_str()?.parse().ok())
        .collect()
}

/// A TCP connection that a process holds, duplicated here.
pub(super) struct HeldConnection {
    pub(super) socket: OwnedFd,
    pub(super) local: SocketAddrV4,
    pub(super) peer: SocketAddrV4,
}

/// The first connected IPv4 socket of process `pid` whose addresses are `wanted`. It looks
/// at that process's descriptors only: `/proc/net/tcp` walks the whole established hash
/// table (262,144 buckets here, shared by every network namespace), 3.5 ms a read, and the
/// callers poll during the freeze, on the cores it needs.
pub(super) fn connection_held(
    pid: i32,
    wanted: impl Fn(SocketAddrV4, SocketAddrV4) -> bool,
) -> Result<Option<HeldConnection>> {
    use rustix::net::{getpeername, getsockname};
    socket_held(pid, |socket| {
        // Not IPv4, or not connected (a listening socket): not it.
        let local = getsockname(&socket).ok()?.try_into().ok()?;
        let peer = getpeername(&socket).ok().flatten()?.try_into().ok()?;
        wanted(local, peer).then_some(HeldConnection {
            socket,
            local,
            peer,
        })
    })
}

/// The listening IPv4 socket of process `pid` bound to `at`, like [`connection_held`].
pub(super) fn listener_held(pid: i32, at: SocketAddrV4) -> Result<Option<OwnedFd>> {
    socket_held(pid, |socket| {
        let local: SocketAddrV4 = rustix::net::getsockname(&socket).ok()?.try_into().ok()?;
        let listening = rustix::net::sockopt::socket_acceptconn(&socket).ok()?;
        (local == at && listening).then_some(socket)
    })
}

/// The first of the sockets of process `pid`, each duplicated here, that `pick` takes.
fn socket_held<T>(pid: i32, pick: impl FnMut(OwnedFd) -> Option<T>) -> Result<Option<T>> {
    let sockets = descriptors(pid, |link| link.starts_with("socket:["));
    if sockets.is_empty() {
        return Ok(None);
    }
    let pidfd = pidfd(pid)?;
    // One closed meanwhile is passed over.
    Ok(sockets
        .into_iter()
        .filter_map(|fd| getfd(&pidfd, fd).ok())
        .find_map(pick))
}

/// The process that holds socket `inode`.
pub(super) fn socket_holder(inode: u64) -> Option<i32> {
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|&pid| !descriptors(pid, |link| link == wanted).is_empty())
}

/// The processes whose command line (program first) `matches`. A zombie has none.
pub(super) fn processes_running(matches: impl Fn(&[&str]) -> bool) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &i32| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|line| {
                let line = String::from_utf8_lossy(&line);
                let args: Vec<&str> = line.split_terminator('\0').collect();
                !args.is_empty() && matches(&args)
            })
        })
        .collect()
}

/// A duplicate of descriptor `fd` of process `pid`.
pub(super) fn borrow_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    getfd(&pidfd(pid)?, fd)
}

fn pidfd(pid: i32) -> Result<OwnedFd> {
    use rustix::process::{pidfd_open, Pid, PidfdFlags};
    let pid = Pid::from_raw(pid).ok_or_else(|| anyhow!("pid {pid}"))?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

fn getfd(pidfd: &OwnedFd, fd: i32) -> Result<OwnedFd> {
    use rustix::process::{pidfd_getfd, PidfdGetfdFlags};
    Ok(pidfd_getfd(pidfd, fd, PidfdGetfdFlags::empty())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn reads_proc_net_tcp_lines() {
        let line = "   0: 0B004D0A:6978 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4367687 1 0000000000000000 100 0 0 10 0";
        let s = parse_tcp_line(line).unwrap();
        assert_eq!(s.local, "10.77.0.11:27000".parse().unwrap());
        assert!(s.listening);
        assert_eq!(s.inode, 4367687);
        assert!(parse_tcp_line("  sl  local_address rem_address").is_none());
    }

    /// A local address of these tests' sockets, all IPv4.
    fn v4(address: std::io::Result<SocketAddr>) -> SocketAddrV4 {
        match address.unwrap() {
            SocketAddr::V4(address) => address,
            other => panic!("not IPv4: {other}"),
        }
    }

    #[test]
    fn finds_a_connection_among_a_processs_descriptors_not_its_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = v4(listener.local_addr());
        let me = std::process::id() as i32;
        assert!(connection_held(me, |local, _| local == at)
            .unwrap()
            .is_none());
        let client = std::net::TcpStream::connect(at).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let from = v4(client.local_addr());
        let held = connection_held(me, |local, _| local == at)
            .unwrap()
            .unwrap();
        assert_eq!((held.local, held.peer), (at, from));
        let held = connection_held(me, |_, peer| peer == at).unwrap().unwrap();
        assert_eq!((held.local, held.peer), (from, at));
    }

    #[test]
    fn finds_a_listener_whose_connections_take_its_options() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = v4(listener.local_addr());
        let me = std::process::id() as i32;
        let other = SocketAddrV4::new(*at.ip(), at.port().wrapping_add(1));
        assert!(listener_held(me, other).unwrap().is_none());
        let held = listener_held(me, at).unwrap().expect("the listener");
        rustix::net::sockopt::set_tcp_nodelay(&held, true).unwrap();
        let _client = std::net::TcpStream::connect(at).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn finds_a_process_by_its_command_line() {
        let me = std::env::args().next().unwrap();
        let found = processes_running(|args| args[0] == me);
        assert!(found.contains(&(std::process::id() as i32)), "{found:?}");
        assert!(processes_running(|args| args[0] == "no such program").is_empty());
    }
}
