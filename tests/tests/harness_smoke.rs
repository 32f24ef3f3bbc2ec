//! The harness must not rot: a quick run (12 s of iperf3 TCP, one migration h1 -> h2) in a
//! real lab must produce a report in which the connection survived, and a plot.
//! Ignored, with the reason, like the other lab tests: without root, or with `LM_LAB_SKIP=1`.

fn main() {
    lab::run_tests(
        lab::skip_reason(),
        &[("harness_smoke_run", harness_smoke_run)],
    )
}

fn harness_smoke_run() {
    let out = tempfile::tempdir().expect("temp dir");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["--smoke", "--out"])
        .arg(out.path())
        .status()
        .expect("run harness");
    assert!(status.success(), "harness --smoke failed: {status}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("report.json")).expect("report.json"),
    )
    .expect("report.json is JSON");
    let migrations = report["runs"][0]["migrations"]
        .as_array()
        .expect("migrations");
    assert_eq!(migrations.len(), 1, "{report:#}");
    assert_eq!(migrations[0]["survived"], true, "{:#}", migrations[0]);
    assert!(std::fs::metadata(out.path().join("throughput.png"))
        .map(|m| m.len() > 0)
        .unwrap_or(false));
    assert!(out.path().join("summary.md").exists());
}
