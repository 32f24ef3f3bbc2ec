//! agent-client as a user runs it: what it says when a migration cannot even start.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

/// A migration that fails is said once, on the `error:` line (not again as a log line),
/// and without colour codes when stderr is not a terminal.
#[test]
fn a_failure_is_said_once_and_without_colour() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&token)
        .unwrap()
        .write_all("t".repeat(64).as_bytes())
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agent-client"))
        .args(["--container", "web", "--dest", "127.0.0.1:9"])
        .arg("--token-file")
        .arg(&token)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--podman-socket")
        .arg(dir.path().join("no-podman.sock"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(!stderr.contains('\x1b'), "colour codes: {stderr:?}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("ERROR"), "said twice: {stderr}");
}

/// A destination or container that cannot be is refused before anything starts, saying
/// what is wrong with it.
#[test]
fn a_bad_destination_or_container_name_is_named() {
    for (args, said) in [
        (
            ["--container", "web", "--dest", "h2:99999"],
            "port 99999 is out of range",
        ),
        (
            ["--container", "../../etc", "--dest", "h2"],
            "not a letter or digit",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_agent-client"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(said), "{args:?}: {stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_agent-client"))
        .args(["check", "--container", "web", "--dest", "h2:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("port 0 is out of range"), "{stderr}");
}

/// Flags for every command (`--state-dir`, `--json`) go before or after a subcommand;
/// those of a single migration before one are refused rather than ignored, and `drain`
/// takes its own.
#[test]
fn global_flags_go_anywhere_and_migration_flags_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_agent-client"))
            .args(args)
            .env("LM_STATE_DIR", &state)
            .env("LM_CONFIG", &config)
            .env_remove("LM_PODMAN_SOCKET")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    };
    let state_arg = state.to_str().unwrap();
    for args in [
        ["--json", "--state-dir", state_arg, "status"],
        ["status", "--json", "--state-dir", state_arg],
    ] {
        let (ok, stdout, stderr) = run(&args);
        assert!(ok, "{args:?}: {stderr}");
        let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert!(status["hostname"].is_string(), "{args:?}: {stdout}");
    }
    let (ok, _, stderr) = run(&["--mode", "post-copy", "drain", "--to", "h2"]);
    assert!(!ok);
    assert!(
        stderr.contains("--mode is an option of a single migration, not of `drain`"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&["--container", "web", "--dest", "h2", "status"]);
    assert!(!ok);
    assert!(
        stderr.contains("--container is an option of a single migration"),
        "{stderr}"
    );
    let (_, _, stderr) = run(&["drain", "--to", "h2", "--mode", "post-copy", "--dry-run"]);
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
}
