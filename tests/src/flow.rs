//! Drives `flowcheck` (see `src/bin/flowcheck.rs`) from the client namespace: a client that
//! checks every echo reply of a flow while containers move.

use std::io::Read;
use std::process::{Child, Stdio};

use anyhow::{Context, Result};

use crate::Lab;

/// A running `flowcheck`, stopped by [`FlowClient::finish`].
pub struct FlowClient {
    child: Child,
    stop_file: String,
    what: String,
}

impl FlowClient {
    /// Starts a `proto` (`tcp`/`udp`) flow from the client to `addr`. With `live`, every
    /// `live`-th reply and every long pause is printed to stderr as it happens.
    pub fn start(lab: &Lab, proto: &str, addr: &str, live: Option<u64>) -> Result<Self> {
        Self::spawn(lab, proto, addr, live, &[])
    }

    /// Starts a UDP flow to `addr` at `rate` datagrams per second, for a measurement: a
    /// datagram that comes after newer ones is counted as reordered, not as lost.
    pub fn start_udp_at(lab: &Lab, addr: &str, rate: f64) -> Result<Self> {
        let rate = rate.to_string();
        Self::spawn(lab, "udp", addr, None, &["--rate", &rate, "--reorder-ok"])
    }

    /// Waits on `addr` in the client namespace for one TCP connection from an echoing
    /// container (a flow the container opened), then checks it like [`Self::start`].
    pub fn listen(lab: &Lab, addr: &str) -> Result<Self> {
        Self::spawn(lab, "tcp", addr, None, &["--listen"])
    }

    fn spawn(
        lab: &Lab,
        proto: &str,
        addr: &str,
        live: Option<u64>,
        extra: &[&str],
    ) -> Result<Self> {
        // One file per client: two clients of the same address stop separately.
        static CLIENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let stop_file = format!(
            "/tmp/lm-flow-stop-{}-{}-{proto}-{}",
            std::process::id(),
            CLIENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            addr.replace(':', "-"),
        );
        let _ = std::fs::remove_file(&stop_file);
        let mut args = vec!["flowcheck", proto, addr, "--stop-file", &stop_file];
        args.extend_from_slice(extra);
        let every = live.map(|n| n.to_string());
        if let Some(every) = &every {
            args.extend(["--live", every]);
        }
        let mut command = lab.command("client", &args)?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if live.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        let child = command.spawn().context("start flowcheck")?;
        Ok(Self {
            child,
            stop_file,
            what: format!("{proto} flow to {addr}"),
        })
    }

    /// What this flow is, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Stops the client and returns its JSON summary (`ok`, `sent`, `received`, `lost`,
    /// `max_pause_ms`, `error`).
    pub fn finish(mut self) -> Result<serde_json::Value> {
        std::fs::write(&self.stop_file, "")?;
        let mut out = String::new();
        self.child
            .stdout
            .as_mut()
            .expect("piped")
            .read_to_string(&mut out)?;
        self.child.wait()?;
        std::fs::remove_file(&self.stop_file)?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("summary of {}: {out:?}", self.what))
    }
}
