//! UDP echo server: lets the lab measure datagram loss and the gap in replies
//! while a container is migrated.

use std::net::UdpSocket;

use workloads::{env_or, exit_on_termination, help_if_asked, say};

fn main() {
    help_if_asked(
        "udp-echo: sends every UDP datagram back to its sender.\n\n\
         Takes no arguments. Environment:\n  \
         PORT  UDP port to listen on (default 5001)",
    );
    exit_on_termination();
    let port: u16 = env_or("PORT", 5001);
    let sock = UdpSocket::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("udp-echo: cannot bind port {port}: {e}");
        std::process::exit(1)
    });
    say(&format!("udp-echo: listening on 0.0.0.0:{port}"));

    // Maximum UDP payload, so no datagram is ever truncated.
    let mut buf = vec![0u8; 65536];
    loop {
        // Errors are per datagram (e.g. ICMP unreachable reported back while
        // the network is being moved); the server must keep serving.
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Err(e) = sock.send_to(&buf[..n], peer) {
                    eprintln!("udp-echo: send to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("udp-echo: recv: {e}"),
        }
    }
}
