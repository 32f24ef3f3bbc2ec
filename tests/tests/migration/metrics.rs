//! The agents' Prometheus metrics (`agent-server --metrics`), scraped inside the lab's
//! hosts before, during and after migrations.

use anyhow::{ensure, Context, Result};
use lab::host::METRICS_ADDR;
use lab::Lab;

use super::{agent_client, migrate};

/// One scrape of `host`'s agent: the OpenMetrics text, checked to be complete.
fn scrape(lab: &Lab, host: &str) -> Result<String> {
    let url = format!("http://{METRICS_ADDR}/metrics");
    let out = lab.exec(host, &["busybox", "wget", "-q", "-O", "-", &url])?;
    let text = String::from_utf8(out.stdout).context("metrics are UTF-8")?;
    ensure!(
        text.ends_with("# EOF\n"),
        "scrape of {host} incomplete:\n{text}"
    );
    Ok(text)
}

/// The value of the sample `series` (name and labels as written, e.g.
/// `x_total{direction="outgoing"}`), 0 where there is none yet.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

const OUT_STARTED: &str = r#"live_migrate_migrations_started_total{direction="outgoing"}"#;
const OUT_SUCCEEDED: &str = r#"live_migrate_migrations_succeeded_total{direction="outgoing"}"#;
const OUT_FAILED_CONNECT: &str =
    r#"live_migrate_migrations_failed_total{direction="outgoing",phase="connect"}"#;
const IN_SUCCEEDED: &str = r#"live_migrate_migrations_succeeded_total{direction="incoming"}"#;
const FREEZES: &str = "live_migrate_freeze_seconds_count";
const TRANSFERRED: &str = "live_migrate_transferred_bytes_total";
const FORWARDED: &str = "live_migrate_forwarded_containers";

/// A migration h1 -> h2 moves the counters on both hosts; a scrape during it answers;
/// a migration to an agent that is not there counts as failed in `connect`.
pub fn scrape_counts_migrations(lab: &Lab) -> Result<()> {
    lab.run_container(
        "h1",
        "metered",
        &["-p", "5300:5000"],
        "localhost/tcp-echo",
        &[],
    )?;
    let source_before = scrape(lab, "h1")?;
    let destination_before = scrape(lab, "h2")?;

    let during = std::thread::scope(|scope| {
        let migration = scope.spawn(|| migrate(lab, "h1", "metered", "h2"));
        let mut scrapes = 0;
        while !migration.is_finished() {
            scrape(lab, "h1")?;
            scrape(lab, "h2")?;
            scrapes += 1;
        }
        migration.join().expect("migration thread")?;
        anyhow::Ok(scrapes)
    })?;
    eprintln!("{during} scrapes of both hosts answered during the migration");

    let source = scrape(lab, "h1")?;
    let destination = scrape(lab, "h2")?;
    for (series, text, before) in [
        (OUT_STARTED, &source, &source_before),
        (OUT_SUCCEEDED, &source, &source_before),
        (FREEZES, &source, &source_before),
        (IN_SUCCEEDED, &destination, &destination_before),
    ] {
        ensure!(
            sample(text, series) == sample(before, series) + 1.0,
            "{series}: {} before, {} after one migration",
            sample(before, series),
            sample(text, series)
        );
    }
    ensure!(
        sample(&source, TRANSFERRED) > sample(&source_before, TRANSFERRED),
        "{TRANSFERRED} did not grow"
    );
    // Its published port stays forwarded from h1 to h2.
    ensure!(
        sample(&source, FORWARDED) >= 1.0,
        "{FORWARDED} is 0:\n{source}"
    );
    let sent = source
        .lines()
        .any(|l| l.starts_with("live_migrate_tunnel_sent_bytes_total{") && !l.ends_with(" 0"));
    ensure!(sent, "no tunnel with bytes sent:\n{source}");

    lab.run_container("h1", "metered2", &[], "localhost/counter", &[])?;
    let (ok, _, _) = agent_client(
        lab,
        "h1",
        &["--container", "metered2", "--dest", "127.0.0.1:7999"],
    )?;
    ensure!(!ok, "a migration to a port nothing listens on succeeded");
    let after_failure = scrape(lab, "h1")?;
    ensure!(
        sample(&after_failure, OUT_FAILED_CONNECT) == sample(&source, OUT_FAILED_CONNECT) + 1.0,
        "{OUT_FAILED_CONNECT} did not count the failure:\n{after_failure}"
    );
    lab.podman("h1", &["rm", "-f", "-t", "0", "metered2"])?;
    lab.podman("h2", &["rm", "-f", "-t", "0", "metered"])?;
    Ok(())
}
