//! End-to-end checks of the lab itself (needs root, podman, CRIU). Ignored, with the
//! reason, when the machine cannot run a lab, or with LM_LAB_SKIP=1.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use lab::{ImageMeta, ImageSource, Lab, LabOptions};

fn main() {
    let skip = lab::skip_reason().or_else(|| {
        let tools = ["/usr/bin/podman", "/usr/sbin/criu", "/usr/bin/nsenter"];
        let missing: Vec<&str> = tools
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        (!missing.is_empty()).then(|| format!("missing {}", missing.join(", ")))
    });
    lab::run_tests(
        skip,
        &[
            (
                "two_hosts_isolation_and_migration",
                two_hosts_isolation_and_migration,
            ),
            (
                "workload_images_have_identical_ids_on_every_host",
                workload_images_have_identical_ids_on_every_host,
            ),
            ("panic_tears_down", panic_tears_down),
        ],
    )
}

/// Nothing of lab `name` is left on the machine.
fn assert_gone(name: &str) {
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.lines().any(|l| l.starts_with(&format!("{name}-"))),
        "netns left: {netns}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&format!("/lm-lab/{name}")), "mounts left");
    assert!(!lab::plan::lab_dir(name).exists());
    assert!(!lab::plan::lab_data_dir(name).exists());
}

const COUNTER: &str = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.1; done";

fn busybox_image(lab: &Lab) -> String {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("bb.tar");
    lab::images::busybox_rootfs_tar(&tar).unwrap();
    lab.import_images(&[ImageSource {
        meta: ImageMeta {
            name: "lab-bb".into(),
            cmd: vec!["sh".into(), "-c".into(), COUNTER.into()],
            env: BTreeMap::new(),
            ports: Vec::new(),
            description: String::new(),
        },
        tarball: tar,
    }])
    .unwrap();
    "localhost/lab-bb".into()
}

fn counts(log: &str) -> Vec<u64> {
    log.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The lab isolates hosts and supports a podman checkpoint/restore between them.
fn two_hosts_isolation_and_migration() {
    lab::install_signal_cleanup().unwrap();
    let t = Instant::now();
    let lab = Lab::up(LabOptions {
        hosts: 2,
        start_agents: false,
        images: false,
        ..Default::default()
    })
    .unwrap();
    eprintln!("lab up (2 hosts, no images): {:?}", t.elapsed());
    let name = lab.name().to_string();
    let image = busybox_image(&lab);

    // Names resolve and the LAN works; each host sees only its own links.
    lab.exec("h1", &["busybox", "ping", "-c1", "-W2", "h2"])
        .unwrap();
    lab.exec("client", &["busybox", "ping", "-c1", "-W2", "h1"])
        .unwrap();
    assert_eq!(lab.exec_stdout("h2", &["hostname"]).unwrap(), "h2");

    lab.podman(
        "h1",
        &[
            "run",
            "-d",
            "--pull=never",
            "--name",
            "c1",
            "-p",
            "8080:5000",
            &image,
        ],
    )
    .unwrap();
    let ip = lab.container_ip("h1", "c1").unwrap();
    assert!(ip.starts_with("10.88.1."), "container IP {ip}");
    assert_eq!(lab.podman("h2", &["ps", "-aq"]).unwrap(), "");
    let links = lab.exec_stdout("h1", &["ls", "/sys/class/net"]).unwrap();
    let mut links: Vec<&str> = links.split_whitespace().collect();
    links.retain(|l| !l.starts_with("veth"));
    links.sort();
    assert_eq!(links, ["eth0", "lo", "podman0"]);

    // A published port is reachable from the client through h1's LAN address.
    lab.podman(
        "h1",
        &[
            "exec", "-d", "c1", "nc", "-ll", "-p", "5000", "-e", "echo", "hi",
        ],
    )
    .unwrap();
    let addr: SocketAddr = "10.77.0.11:8080".parse().unwrap();
    lab.wait_tcp("client", addr, Duration::from_secs(5))
        .unwrap();
    let mut conn = lab
        .connect_tcp("client", addr, Duration::from_secs(2))
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "hi\n");

    // Checkpoint on h1, restore on h2: the count goes on.
    let logged = |host| counts(&lab.podman(host, &["logs", "c1"]).unwrap());
    lab::wait_for("c1 to count on h1", Duration::from_secs(10), || {
        Ok(logged("h1").len() >= 3)
    })
    .unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let archive = ckpt.path().join("c1.tar.gz");
    let archive_s = archive.to_str().unwrap();
    lab.podman(
        "h1",
        &[
            "container",
            "checkpoint",
            "--tcp-established",
            "--export",
            archive_s,
            "c1",
        ],
    )
    .unwrap();
    let before = logged("h1");
    lab.podman(
        "h2",
        &[
            "container",
            "restore",
            "--tcp-established",
            "--import",
            archive_s,
        ],
    )
    .unwrap();
    assert_eq!(lab.container_ip("h2", "c1").unwrap(), ip);
    let last = *before.last().unwrap();
    lab::wait_for(
        "c1 to go on counting on h2",
        Duration::from_secs(10),
        || Ok(logged("h2").last().is_some_and(|&n| n > last)),
    )
    .unwrap();
    let after = logged("h2");
    assert!(after.len() > before.len(), "no progress on h2: {after:?}");
    assert_eq!(
        after.iter().filter(|&&n| n == 0).count(),
        1,
        "restarted from 0"
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "gap in {after:?}"
    );
    assert!(*after.last().unwrap() > last);

    // Rollback: after removing the copy on h2, h1 restores from its own checkpoint.
    lab.podman("h2", &["rm", "-f", "-t", "0", "c1"]).unwrap();
    lab.podman("h1", &["container", "restore", "--tcp-established", "c1"])
        .unwrap();
    lab::wait_for(
        "c1 to go on counting on h1",
        Duration::from_secs(10),
        || Ok(logged("h1").last().is_some_and(|&n| n > last)),
    )
    .unwrap();
    let again = logged("h1");
    assert!(*again.last().unwrap() > last, "{again:?}");

    let t = Instant::now();
    lab.down().unwrap();
    eprintln!("lab down: {:?}", t.elapsed());
    assert_gone(&name);
}

fn workload_images_have_identical_ids_on_every_host() {
    lab::install_signal_cleanup().unwrap();
    let t = Instant::now();
    let lab = Lab::up(LabOptions {
        hosts: 2,
        start_agents: false,
        images: true,
        ..Default::default()
    })
    .unwrap();
    eprintln!("lab up with images: {:?}", t.elapsed());
    let name = lab.name().to_string();
    assert!(!lab.images().is_empty());
    for img in lab.images() {
        let ids: Vec<String> = lab
            .hosts()
            .iter()
            .map(|h| lab::images::image_id(h, &img.reference()).unwrap())
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] == w[1]),
            "{}: {ids:?}",
            img.name
        );
    }
    drop(lab); // Drop tears down too
    assert_gone(&name);
}

/// A panic inside a test still removes the lab (Drop runs during unwinding).
fn panic_tears_down() {
    let name = lab::plan::random_name();
    let n = name.clone();
    let r = std::panic::catch_unwind(move || {
        let lab = Lab::up(LabOptions {
            hosts: 1,
            name: Some(n),
            start_agents: false,
            images: false,
            ..Default::default()
        })
        .unwrap();
        lab.podman("h1", &["ps"]).unwrap();
        panic!("boom");
    });
    assert!(r.is_err());
    assert_gone(&name);
}
