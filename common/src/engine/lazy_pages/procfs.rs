//! What the kernel shows of sockets and descriptors, through procfs: the TCP sockets of
//! this network namespace, which process holds one, and a duplicate of another process's
//! descriptor.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;

use anyhow::{anyhow, Context, Result};

use super::page_server::PageServer;

/// One line of `/proc/net/tcp`.
pub(super) struct TcpSocket {
    pub(super) local: SocketAddrV4,
    pub(super) remote: SocketAddrV4,
    pub(super) listening: bool,
    pub(super) inode: u64,
}

/// The IPv4 TCP sockets of this network namespace, with the inode that finds each one's
/// holder ([`socket_holder`], [`connections_to`]).
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

/// Whether a socket listens on `server`.
pub(super) fn listening(server: PageServer) -> Result<bool> {
    let at = SocketAddrV4::new(server.address, server.port);
    Ok(tcp_sockets()?
        .into_iter()
        .any(|s| s.listening && s.local == at))
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

/// The connections to `remote` that process `pid` holds, each with its descriptor there.
pub(super) fn connections_to(pid: i32, remote: SocketAddrV4) -> Result<Vec<(TcpSocket, i32)>> {
    Ok(tcp_sockets()?
        .into_iter()
        .filter(|s| s.remote == remote && !s.listening)
        .filter_map(|s| {
            let link = format!("socket:[{}]", s.inode);
            let fd = *descriptors(pid, |l| l == link).first()?;
            Some((s, fd))
        })
        .collect())
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
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let pid = Pid::from_raw(pid).ok_or_else(|| anyhow!("pid {pid}"))?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    Ok(pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_tcp_lines() {
        let line = "   0: 0B004D0A:6978 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4367687 1 0000000000000000 100 0 0 10 0";
        let s = parse_tcp_line(line).unwrap();
        assert_eq!(s.local, "10.77.0.11:27000".parse().unwrap());
        assert!(s.listening);
        assert_eq!(s.inode, 4367687);
        assert!(parse_tcp_line("  sl  local_address rem_address").is_none());
    }

    #[test]
    fn finds_a_process_by_its_command_line() {
        let me = std::env::args().next().unwrap();
        let found = processes_running(|args| args[0] == me);
        assert!(found.contains(&(std::process::id() as i32)), "{found:?}");
        assert!(processes_running(|args| args[0] == "no such program").is_empty());
    }
}
