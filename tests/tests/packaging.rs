//! What a real host gets (README, "On real hosts"): `make install` into a staging
//! directory, and the Debian package of `make deb`, each of the debug build. Both hold the
//! two programs, the service unit and a default configuration both programs accept.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `command`, and returns its stdout; a failure shows what it said.
fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn make(target: &str, vars: &[(&str, &Path)]) -> String {
    let mut make = Command::new("make");
    make.arg("-C")
        .arg(workspace())
        .arg(target)
        .arg("PROFILE=debug");
    for (name, value) in vars {
        make.arg(format!("{name}={}", value.display()));
    }
    run(&mut make)
}

/// The configuration file is valid for both programs: each reads and checks it before it
/// looks at the rest of its command line.
fn assert_both_programs_accept(config: &Path, programs: &Path) {
    for program in ["agent-server", "agent-client"] {
        run(Command::new(programs.join(program))
            .arg("--config")
            .arg(config)
            .arg("--help"));
    }
}

/// `systemd-analyze verify` on the unit. It checks that ExecStart's program exists, and
/// the package is not installed here: a copy of the unit points at the unpacked program,
/// and that line is all it changes.
fn assert_unit_verifies(unit: &Path, program: &Path, dir: &Path) {
    let text = std::fs::read_to_string(unit).unwrap();
    for line in [
        "Requires=podman.socket",
        "After=podman.socket network-online.target",
        "KillMode=process",
        "WantedBy=multi-user.target",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    let exec = text
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart");
    let copy = dir.join("agent-server.service");
    std::fs::write(
        &copy,
        text.replace(exec, &format!("ExecStart={}", program.display())),
    )
    .unwrap();
    run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy));
}

#[test]
fn make_install_places_programs_unit_config_and_state_dir() {
    let root = tempfile::tempdir().unwrap();
    let prefix = Path::new("/usr/local");
    make("install", &[("DESTDIR", root.path()), ("PREFIX", prefix)]);
    let bin = root.path().join("usr/local/bin");
    for program in ["agent-server", "agent-client"] {
        let mode = std::fs::metadata(bin.join(program))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{program}");
    }
    let unit = root.path().join("etc/systemd/system/agent-server.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains("\nExecStart=/usr/local/bin/agent-server\n"),
        "{text}"
    );
    let scratch = tempfile::tempdir().unwrap();
    assert_unit_verifies(&unit, &bin.join("agent-server"), scratch.path());
    let state = std::fs::metadata(root.path().join("var/lib/live-migrate")).unwrap();
    assert_eq!(state.permissions().mode() & 0o777, 0o700);
    let config = root.path().join("etc/live-migrate/config.toml");
    assert_both_programs_accept(&config, &bin);

    // Installed again (an upgrade), it keeps the host's configuration.
    let edited = std::fs::read_to_string(&config)
        .unwrap()
        .replace("sweep_seconds = 5", "sweep_seconds = 9");
    std::fs::write(&config, &edited).unwrap();
    make("install", &[("DESTDIR", root.path()), ("PREFIX", prefix)]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);

    make("uninstall", &[("DESTDIR", root.path()), ("PREFIX", prefix)]);
    assert!(!bin.join("agent-server").exists());
    assert!(!unit.exists());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
}

#[test]
fn make_deb_builds_a_package_with_programs_unit_config_and_dependencies() {
    let out = tempfile::tempdir().unwrap();
    make("deb", &[("DEB_DIR", out.path())]);
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb in DEB_DIR");

    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/agent-server",
        "./usr/bin/agent-client",
        "./usr/lib/systemd/system/agent-server.service",
        "./etc/live-migrate/config.toml",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }
    let depends = run(Command::new("dpkg-deb")
        .arg("--field")
        .arg(&deb)
        .arg("Depends"));
    for dependency in [
        "podman",
        "runc",
        "criu (>= 4.2)",
        "wireguard-tools",
        "wireguard-go",
        "nftables",
        "iptables",
        "conntrack",
        "iproute2",
    ] {
        assert!(
            depends.split(", ").any(|d| d.trim() == dependency),
            "{dependency} not in Depends: {depends}"
        );
    }

    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(control.path()));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert!(conffiles
        .lines()
        .any(|l| l == "/etc/live-migrate/config.toml"));
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(postinst.contains("install -d -m 0700 /var/lib/live-migrate"));
    let postrm = std::fs::read_to_string(control.path().join("postrm")).unwrap();
    assert!(postrm.contains("rm -rf /var/lib/live-migrate"));

    let unpacked = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(unpacked.path()));
    let bin = unpacked.path().join("usr/bin");
    let unit = unpacked
        .path()
        .join("usr/lib/systemd/system/agent-server.service");
    assert!(std::fs::read_to_string(&unit)
        .unwrap()
        .contains("\nExecStart=/usr/bin/agent-server\n"));
    assert_unit_verifies(&unit, &bin.join("agent-server"), control.path());
    assert_both_programs_accept(&unpacked.path().join("etc/live-migrate/config.toml"), &bin);
}
