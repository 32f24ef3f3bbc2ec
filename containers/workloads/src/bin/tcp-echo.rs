//! TCP echo server: lets the lab check that established TCP flows survive a
//! migration (bytes sent before, during and after must all come back).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use workloads::{env_or, exit_on_termination, help_if_asked, say};

fn main() {
    help_if_asked(
        "tcp-echo: echoes every byte of every TCP connection back to its sender.\n\n\
         Takes no arguments. Environment:\n  \
         PORT      TCP port to listen on (default 5000)\n  \
         COUNT_MS  also print `count N` (N = 1, 2, ...) every COUNT_MS milliseconds, so a \
         test sees that the process ran once, with no gap and no repeat (default 0: off)",
    );
    exit_on_termination();
    let port: u16 = env_or("PORT", 5000);
    let count_ms: u64 = env_or("COUNT_MS", 0);
    if count_ms > 0 {
        thread::spawn(move || {
            for n in 1u64.. {
                say(&format!("count {n}"));
                thread::sleep(Duration::from_millis(count_ms));
            }
        });
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("tcp-echo: cannot listen on port {port}: {e}");
        std::process::exit(1)
    });
    say(&format!("tcp-echo: listening on 0.0.0.0:{port}"));

    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                // A thread per connection keeps one stalled client from
                // delaying the others, which would look like migration loss.
                thread::spawn(move || {
                    if let Err(e) = echo(stream) {
                        eprintln!("tcp-echo: connection error: {e}");
                    }
                });
            }
            Err(e) => {
                // Accept errors (e.g. EMFILE, aborted handshakes) are
                // transient; back off briefly instead of spinning or dying.
                eprintln!("tcp-echo: accept error: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    // Echo small writes at once so the client measures network latency, not
    // Nagle delays.
    stream.set_nodelay(true)?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
    }
}
