//! `agent-server` stops in order on SIGTERM and SIGINT: it stops accepting, closes
//! sessions that have no migration (one still in its handshake here), exits 0, and starts
//! again on the same state directory.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn start(dir: &Path, listen: SocketAddr) -> Child {
    Command::new(env!("CARGO_BIN_EXE_agent-server"))
        .arg("--listen")
        .arg(listen.to_string())
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--token-file")
        .arg(dir.join("token"))
        // Nothing here asks podman: no migration comes.
        .arg("--podman-socket")
        .arg(dir.join("no-podman.sock"))
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `check` holds, failing after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Signals `agent`, and returns its log once it has exited 0.
fn stop(mut agent: Child, signal: Signal) -> String {
    kill(Pid::from_raw(agent.id() as i32), signal).unwrap();
    let mut status = None;
    wait_for("agent-server to exit", Duration::from_secs(20), || {
        status = agent.try_wait().unwrap();
        status.is_some()
    });
    let mut log = String::new();
    agent
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    agent
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        status.unwrap().success(),
        "{signal} exit {status:?}:\n{log}"
    );
    log
}

#[test]
fn sigterm_and_sigint_stop_in_order_and_the_next_start_recovers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), "").unwrap();
    let init = Command::new(env!("CARGO_BIN_EXE_agent-server"))
        .arg("init")
        .arg("--token-file")
        .arg(dir.path().join("token"))
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let listen = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    let agent = start(dir.path(), listen);
    let mut in_handshake = None;
    wait_for("agent-server to accept", Duration::from_secs(20), || {
        in_handshake = TcpStream::connect(listen).ok();
        in_handshake.is_some()
    });
    let mut in_handshake = in_handshake.unwrap();
    let log = stop(agent, Signal::SIGTERM);
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
    assert!(log.contains("agent-server stopped"), "{log}");
    // The peer that never authenticated was let go, not left hanging.
    in_handshake
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut said = Vec::new();
    if let Err(e) = in_handshake.read_to_end(&mut said) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "the session in its handshake was not closed: {e}"
        );
    }
    assert!(TcpStream::connect(listen).is_err(), "still accepting");

    // The state directory is free again (its lock released) and recovers cleanly.
    let again = start(dir.path(), listen);
    wait_for(
        "the second agent-server to accept",
        Duration::from_secs(20),
        || TcpStream::connect(listen).is_ok(),
    );
    let log = stop(again, Signal::SIGINT);
    assert!(log.contains("SIGINT: shutting down"), "{log}");
}
