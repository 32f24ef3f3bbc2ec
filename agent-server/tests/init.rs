//! `agent-server init`, as a user runs it on a new host.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn init(token: &std::path::Path, force: bool) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agent-server"));
    c.arg("init").arg("--token-file").arg(token);
    if force {
        c.arg("--force");
    }
    c.output().unwrap()
}

/// It writes a private token and says how to share it; run again it refuses to replace
/// it, unless --force.
#[test]
fn init_writes_a_token_and_replaces_one_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("live-migrate/token");
    let first = init(&token, false);
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains("scp -p"));
    let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let written = std::fs::read_to_string(&token).unwrap();

    let again = init(&token, false);
    assert!(!again.status.success(), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&token).unwrap(), written);

    let forced = init(&token, true);
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(std::fs::read_to_string(&token).unwrap(), written);
}

/// The configuration file sets what no environment variable or flag does: a flag wins
/// over its variable, which wins over the file. A wrong key is named.
#[test]
fn config_file_yields_to_environment_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "token_file = \"/nonexistent/from-file\"\n").unwrap();
    let run = |env: Option<&str>, flag: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_agent-server"));
        c.arg("--config").arg(&config).env_remove("LM_TOKEN_FILE");
        if let Some(v) = env {
            c.env("LM_TOKEN_FILE", v);
        }
        if let Some(v) = flag {
            c.args(["--token-file", v]);
        }
        String::from_utf8_lossy(&c.output().unwrap().stderr).into_owned()
    };
    assert!(run(None, None).contains("/nonexistent/from-file"));
    assert!(run(Some("/nonexistent/from-env"), None).contains("/nonexistent/from-env"));
    let said = run(
        Some("/nonexistent/from-env"),
        Some("/nonexistent/from-flag"),
    );
    assert!(said.contains("/nonexistent/from-flag"), "{said}");

    std::fs::write(&config, "[server]\nlisen = \"0.0.0.0:1\"\n").unwrap();
    assert!(run(None, None).contains("unknown key `server.lisen`"));
}
