//! `flowcheck`: a client that proves a flow survived. It sends sequence-numbered messages
//! to an echo server, checks that every reply comes back intact and in order, and reports
//! the longest pause between replies as JSON when it stops (after `--seconds`, or when
//! the file given with `--stop-file` appears).
//!
//! TCP: any reset, EOF or wrong byte ends the run as a failure. UDP: lost datagrams are
//! counted (a migration freeze may drop a few); the flow must resume. A datagram that
//! comes after newer ones ends the run too, unless `--reorder-ok`: then it is counted as
//! reordered, and not as lost.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Parser)]
struct Args {
    /// Transport of the flow to check.
    #[arg(value_enum)]
    proto: Proto,
    /// Echo server address (with `--listen`: the address to accept one connection on,
    /// for a flow the echoing side opened).
    addr: SocketAddr,
    /// TCP only: wait for the echoing side to connect instead of connecting to it.
    #[arg(long)]
    listen: bool,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 3600.0)]
    seconds: f64,
    /// Stop as soon as this file exists.
    #[arg(long)]
    stop_file: Option<PathBuf>,
    /// Time between messages, in milliseconds.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// UDP only: datagrams per second (instead of --interval-ms), e.g. 6250.
    #[arg(long)]
    rate: Option<f64>,
    /// Print every Nth reply and every pause over 200 ms to stderr, as they happen.
    #[arg(long)]
    live: Option<u64>,
    /// UDP only: a datagram that comes after newer ones is counted (`reordered`), not an
    /// error.
    #[arg(long)]
    reorder_ok: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Serialize, Default)]
struct Summary {
    ok: bool,
    sent: u64,
    received: u64,
    lost: u64,
    /// UDP: datagrams that came after newer ones (with `--reorder-ok`).
    reordered: u64,
    max_pause_ms: f64,
    error: Option<String>,
}

fn main() {
    let args = Args::parse();
    let mut summary = Summary::default();
    let result = match args.proto {
        Proto::Tcp => tcp(&args, &mut summary),
        Proto::Udp => udp(&args, &mut summary),
    };
    summary.ok = result.is_ok();
    summary.error = result.err().map(|e| format!("{e:#}"));
    println!("{}", serde_json::to_string(&summary).expect("serialisable"));
    std::process::exit(if summary.ok { 0 } else { 1 });
}

fn should_stop(args: &Args, started: Instant) -> bool {
    started.elapsed().as_secs_f64() >= args.seconds
        || args.stop_file.as_ref().is_some_and(|f| f.exists())
}

/// Tracks the longest time without a reply, and tells a watching person about replies.
struct PauseMeter {
    last: Instant,
    live: Option<u64>,
}

impl PauseMeter {
    fn new(live: Option<u64>) -> Self {
        Self {
            last: Instant::now(),
            live,
        }
    }

    fn reply(&mut self, summary: &mut Summary, reply: &str) {
        let pause = self.last.elapsed().as_secs_f64() * 1e3;
        summary.max_pause_ms = summary.max_pause_ms.max(pause);
        self.last = Instant::now();
        if let Some(every) = self.live {
            if pause > 200.0 {
                eprintln!(
                    "   client: pause of {pause:.0} ms, then reply {reply} (intact, in order)"
                );
            } else if summary.received.is_multiple_of(every.max(1)) {
                eprintln!("   client: reply {reply}");
            }
        }
    }
}

fn tcp(args: &Args, summary: &mut Summary) -> Result<()> {
    let stream = if args.listen {
        let listener =
            TcpListener::bind(args.addr).with_context(|| format!("listen on {}", args.addr))?;
        listener.accept().context("accept")?.0
    } else {
        TcpStream::connect_timeout(&args.addr, Duration::from_secs(5))
            .with_context(|| format!("connect {}", args.addr))?
    };
    stream.set_nodelay(true)?;
    // A flow that silently stops (packets dropped on the way) must fail, not hang.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let started = Instant::now();
    let mut meter = PauseMeter::new(args.live);
    let mut line = String::new();
    while !should_stop(args, started) {
        let message = format!("{}\n", summary.sent);
        writer.write_all(message.as_bytes()).context("send")?;
        summary.sent += 1;
        line.clear();
        if reader.read_line(&mut line).context("receive")? == 0 {
            bail!(
                "connection closed by the server after {} replies",
                summary.received
            );
        }
        if line != message {
            bail!("reply {:?} to message {:?}", line, message.trim());
        }
        summary.received += 1;
        meter.reply(summary, line.trim());
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    Ok(())
}

fn udp(args: &Args, summary: &mut Summary) -> Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    // Room for the replies to a burst of datagrams let through at once after a freeze:
    // datagrams lost in this client's own buffer are not the migration's.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(32 << 20))
        .context("sizing the receive buffer")?;
    socket.connect(args.addr)?;
    let period = match args.rate {
        Some(rate) if rate > 0.0 => Duration::from_secs_f64(1.0 / rate),
        _ => Duration::from_millis(args.interval_ms),
    };
    let started = Instant::now();
    let mut meter = PauseMeter::new(args.live);
    let mut replies = Replies::default();
    let mut next_send = started;
    let mut buf = [0u8; 64];
    while !should_stop(args, started) {
        if Instant::now() >= next_send {
            socket.send(&summary.sent.to_be_bytes()).context("send")?;
            summary.sent += 1;
            next_send += period;
        }
        // Replies until the next send is due; a late one is fine.
        let wait = next_send.saturating_duration_since(Instant::now());
        socket.set_read_timeout(Some(wait.max(Duration::from_micros(20))))?;
        match socket.recv(&mut buf) {
            Ok(8) => {
                let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                replies.add(seq, args.reorder_ok, summary)?;
                meter.reply(summary, &seq.to_string());
            }
            Ok(n) => bail!("reply of {n} bytes"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receive"),
        }
    }
    // Replies still on their way count as received, not lost.
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    while let Ok(8) = socket.recv(&mut buf) {
        let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
        // A late or repeated one here is just not counted (as before the stop).
        let _ = replies.add(seq, args.reorder_ok, summary);
    }
    summary.lost = replies.missing.len() as u64 + (summary.sent - replies.next_expected);
    if summary.received == 0 {
        bail!("no reply at all");
    }
    // The flow must have resumed: replies kept coming until the end.
    if meter.last.elapsed() > Duration::from_secs(2) {
        bail!("no reply in the last {:?}", meter.last.elapsed());
    }
    Ok(())
}

/// The sequence numbers of the replies so far.
#[derive(Default)]
struct Replies {
    next_expected: u64,
    /// Skipped by a newer reply and not come since.
    missing: BTreeSet<u64>,
}

impl Replies {
    /// Takes reply `seq`: one older than the newest is an error unless `reorder_ok`,
    /// and counted as reordered then; a duplicate is always an error.
    fn add(&mut self, seq: u64, reorder_ok: bool, summary: &mut Summary) -> Result<()> {
        if seq >= self.next_expected {
            self.missing.extend(self.next_expected..seq);
            self.next_expected = seq + 1;
        } else if !reorder_ok {
            bail!("datagram {seq} arrived after {}", self.next_expected - 1);
        } else if self.missing.remove(&seq) {
            summary.reordered += 1;
        } else {
            bail!("datagram {seq} arrived twice");
        }
        summary.received += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_datagram_is_reordered_not_lost_only_when_allowed() {
        let mut summary = Summary::default();
        let mut replies = Replies::default();
        for seq in [0, 1, 3, 4] {
            replies.add(seq, true, &mut summary).unwrap();
        }
        assert_eq!(replies.missing, BTreeSet::from([2]));
        replies.add(2, true, &mut summary).unwrap();
        assert!(replies.missing.is_empty());
        assert_eq!((summary.received, summary.reordered), (5, 1));
        assert!(replies.add(2, true, &mut summary).is_err(), "a duplicate");
        let mut strict = Replies::default();
        strict.add(1, false, &mut summary).unwrap();
        assert!(strict.add(0, false, &mut summary).is_err());
    }
}
