//! Preflight: what each host has and can do ([`HostReport`]), and whether a container can
//! move from one to the other ([`assess`]). The prepare phase refuses to migrate when the
//! assessment finds a problem; `agent-client check` shows the whole assessment.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::engine::criu;
use crate::engine::podman::PodmanClient;
use crate::protocol::{ContainerRef, CriuVersion, HostReport, PortInUse};

/// Gathers this host's report. With `incoming`, it also looks for what would collide with
/// that container arriving here: a container of the same name or ID, its address or its
/// published ports already in use.
pub async fn host_report(
    podman: &PodmanClient,
    state_dir: &Path,
    incoming: Option<&ContainerRef>,
) -> Result<HostReport> {
    // Each CRIU question is a process of its own: ask them all at once.
    let (engine, criu_version, criu_check_problem, features) = tokio::join!(
        crate::engine::kept_info::engine_info(podman, state_dir),
        criu::version(),
        criu::check(),
        futures_util::future::join_all(criu::OPTIONAL_FEATURES.map(criu::has_feature)),
    );
    let engine = engine?;
    let criu_features: Vec<(String, bool)> = criu::OPTIONAL_FEATURES
        .iter()
        .map(|f| f.to_string())
        .zip(features)
        .collect();
    let uffd = criu_features
        .iter()
        .any(|(f, available)| f == "uffd-noncoop" && *available);
    let mut report = HostReport {
        hostname: hostname(),
        podman_version: engine.podman_version,
        criu: criu_version.map_or_else(
            |e| CriuVersion::Missing(format!("{e:#}")),
            CriuVersion::Installed,
        ),
        criu_check_problem,
        criu_features,
        post_copy_problem: crate::engine::lazy_pages::host_problem(uffd),
        oci_runtime: engine.oci_runtime,
        free_state_bytes: free_bytes(state_dir)?,
        memory_available_bytes: memory_available()?,
        has_image: true,
        conflicting_container: None,
        address_in_use_by: None,
        ports_in_use: Vec::new(),
    };
    if let Some(container) = incoming {
        report.has_image = podman.image_exists(&container.image_id).await?;
        for key in [&container.name, &container.id] {
            if let Some(existing) = podman.find(key).await? {
                report.conflicting_container = Some(existing.name);
            }
        }
        for other in podman.list_running().await? {
            if container.address.is_some() && other.ipv4() == container.address {
                report.address_in_use_by = Some(other.name.clone());
            }
            for port in &other.published_ports {
                if container
                    .published_ports
                    .iter()
                    .any(|p| p.host_port == port.host_port && p.protocol == port.protocol)
                {
                    report.ports_in_use.push(PortInUse {
                        protocol: port.protocol,
                        host_port: port.host_port,
                        container: other.name.clone(),
                    });
                }
            }
        }
    }
    Ok(report)
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn memory_available() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    meminfo_available(&meminfo).context("no MemAvailable in /proc/meminfo")
}

fn meminfo_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Ok,
    /// The migration can go ahead, but the operator should know.
    Warning,
    /// The migration would fail: it is refused.
    Problem,
}

/// One line of a preflight assessment.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub host: String,
    pub check: String,
    pub severity: Severity,
    pub detail: String,
    /// What to do about it, for warnings and problems.
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(host: &str, check: &str, detail: impl Into<String>) -> Self {
        Self {
            host: host.to_string(),
            check: check.to_string(),
            severity: Severity::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn flagged(
        severity: Severity,
        host: &str,
        check: &str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            severity,
            fix: Some(fix.into()),
            ..Self::ok(host, check, detail)
        }
    }

    pub fn problem(
        host: &str,
        check: &str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::flagged(Severity::Problem, host, check, detail, fix)
    }

    pub fn warning(
        host: &str,
        check: &str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::flagged(Severity::Warning, host, check, detail, fix)
    }
}

/// Everything that decides whether `container`, using `memory_bytes`, can move from the
/// host of `source` to the host of `destination` (only the source's part without it).
pub fn assess(
    source: &HostReport,
    destination: Option<&HostReport>,
    container: &ContainerRef,
    memory_bytes: Option<u64>,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    host_findings(source, memory_bytes, &mut findings);
    let Some(destination) = destination else {
        return findings;
    };
    host_findings(destination, memory_bytes, &mut findings);
    let dest = destination.hostname.as_str();
    if source.podman_version.split('.').next() != destination.podman_version.split('.').next() {
        findings.push(Finding::warning(
            dest,
            "podman",
            format!(
                "podman {} here, {} on the source",
                destination.podman_version, source.podman_version
            ),
            "install the same podman major version on both hosts (scripts/setup-host.sh)",
        ));
    }
    findings.push(if destination.has_image {
        Finding::ok(dest, "image", format!("{} present", container.image_name))
    } else {
        Finding::ok(
            dest,
            "image",
            format!(
                "{} missing: it is sent before the freeze",
                container.image_name
            ),
        )
    });
    findings.push(match &destination.conflicting_container {
        Some(existing) => Finding::problem(
            dest,
            "name",
            format!("container {existing} has the same name or ID"),
            format!("remove it on {dest}: podman rm -f {existing}"),
        ),
        None => Finding::ok(
            dest,
            "name",
            format!("no container named {}", container.name),
        ),
    });
    if let Some(address) = container.address {
        findings.push(match &destination.address_in_use_by {
            Some(other) => Finding::problem(
                dest,
                "address",
                format!("{address} is used by container {other}"),
                format!("stop {other} on {dest}, or migrate to a host where {address} is free"),
            ),
            None => Finding::ok(dest, "address", format!("{address} free")),
        });
    }
    if !container.published_ports.is_empty() {
        findings.push(if destination.ports_in_use.is_empty() {
            Finding::ok(dest, "ports", "published ports free")
        } else {
            Finding::problem(
                dest,
                "ports",
                format!(
                    "already published: {}",
                    destination
                        .ports_in_use
                        .iter()
                        .map(PortInUse::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "stop the container that publishes them, or pick another destination",
            )
        });
    }
    findings
}

fn host_findings(report: &HostReport, memory_bytes: Option<u64>, out: &mut Vec<Finding>) {
    let host = report.hostname.as_str();
    let supported = matches!(&report.criu, CriuVersion::Installed(v) if criu::is_supported(v));
    out.push(if supported {
        Finding::ok(host, "criu", format!("CRIU {}", report.criu))
    } else {
        Finding::problem(
            host,
            "criu",
            format!(
                "CRIU {}: >= 4.2 is needed to checkpoint TCP connections",
                report.criu
            ),
            "run scripts/setup-host.sh (installs CRIU 4.2 from Debian sid)",
        )
    });
    if let Some(problem) = &report.criu_check_problem {
        out.push(Finding::problem(
            host,
            "criu check",
            problem.clone(),
            "run `criu check` as root and fix what it reports (kernel options, capabilities)",
        ));
    }
    for (feature, available) in &report.criu_features {
        out.push(Finding::ok(
            host,
            &format!("criu {feature}"),
            if *available {
                "available"
            } else {
                "absent (only pre-copy or lazy pages would need it)"
            },
        ));
    }
    out.push(Finding::ok(
        host,
        "post-copy",
        match &report.post_copy_problem {
            None => "available, and a streamed stop-copy".to_string(),
            Some(problem) => {
                format!("unavailable, stop-copy through the archive only: {problem}")
            }
        },
    ));
    out.push(match report.oci_runtime.as_str() {
        "runc" => Finding::ok(host, "runtime", "runc"),
        "crun" => Finding::problem(
            host,
            "runtime",
            "crun cannot checkpoint on this kernel's hybrid cgroups",
            "set runtime = \"runc\" under [engine] in /etc/containers/containers.conf",
        ),
        other => Finding::warning(
            host,
            "runtime",
            format!("{other} is untested"),
            "use runc (runtime = \"runc\" in containers.conf)",
        ),
    });
    out.push(Finding::ok(
        host,
        "podman",
        format!("podman {}", report.podman_version),
    ));
    let free = format!("{} MiB free for archives", report.free_state_bytes >> 20);
    out.push(match memory_bytes {
        // The archive is about as large as the container's memory.
        Some(needed) if report.free_state_bytes < needed + needed / 10 => Finding::problem(
            host,
            "disk",
            format!("{free}; the checkpoint needs about {} MiB", needed >> 20),
            "free space in the state directory (--state-dir)",
        ),
        _ => Finding::ok(host, "disk", free),
    });
}

/// The problems among `findings` as one error, or `Ok` when there are none.
pub fn refuse_on_problems(findings: &[Finding]) -> Result<()> {
    let problems: Vec<String> = findings
        .iter()
        .filter(|f| f.severity == Severity::Problem)
        .map(|f| {
            format!(
                "{} {}: {} (fix: {})",
                f.host,
                f.check,
                f.detail,
                f.fix.as_deref().unwrap_or("-")
            )
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("preflight found problems:\n  {}", problems.join("\n  "))
    }
}

/// This host's name, as the reports show it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Free bytes on the filesystem of `dir` (created if missing), for an unprivileged user.
fn free_bytes(dir: &Path) -> Result<u64> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let stat = nix::sys::statvfs::statvfs(dir)
        .map_err(std::io::Error::from)
        .with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Proto;
    use crate::protocol::PublishedPort;

    #[test]
    fn free_bytes_are_those_of_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(Path::new("/proc/self/status/x")).is_err());
    }

    #[test]
    fn memory_available_is_read_from_meminfo() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_available(meminfo), Some(2048 * 1024));
        assert_eq!(meminfo_available("MemTotal: 1 kB\n"), None);
        assert!(memory_available().unwrap() > 0);
    }

    fn report(name: &str) -> HostReport {
        HostReport {
            hostname: name.into(),
            podman_version: "5.4.2".into(),
            criu: CriuVersion::Installed("4.2.1".into()),
            criu_check_problem: None,
            criu_features: vec![],
            post_copy_problem: None,
            oci_runtime: "runc".into(),
            free_state_bytes: 10 << 30,
            memory_available_bytes: 8 << 30,
            has_image: true,
            conflicting_container: None,
            address_in_use_by: None,
            ports_in_use: vec![],
        }
    }

    fn container() -> ContainerRef {
        ContainerRef {
            id: "abc".into(),
            name: "web".into(),
            image_id: "img".into(),
            image_name: "localhost/web".into(),
            address: Some("10.88.1.5".parse().unwrap()),
            published_ports: vec![PublishedPort {
                host_port: 8080,
                container_port: 80,
                protocol: Proto::Tcp,
            }],
        }
    }

    #[test]
    fn fit_hosts_pass() {
        let findings = assess(
            &report("h1"),
            Some(&report("h2")),
            &container(),
            Some(1 << 20),
        );
        assert!(findings.iter().all(|f| f.severity == Severity::Ok));
        refuse_on_problems(&findings).unwrap();
    }

    #[test]
    fn each_blocker_is_a_problem_with_a_fix() {
        let mut source = report("h1");
        source.criu = CriuVersion::Installed("4.1".into());
        let mut dest = report("h2");
        dest.oci_runtime = "crun".into();
        dest.conflicting_container = Some("web".into());
        dest.address_in_use_by = Some("other".into());
        dest.ports_in_use = vec![PortInUse {
            protocol: Proto::Tcp,
            host_port: 8080,
            container: "other".into(),
        }];
        dest.free_state_bytes = 1 << 20;
        let findings = assess(&source, Some(&dest), &container(), Some(1 << 30));
        let problems: Vec<_> = findings
            .iter()
            .filter(|f| f.severity == Severity::Problem)
            .map(|f| (f.host.as_str(), f.check.as_str()))
            .collect();
        assert_eq!(
            problems,
            [
                ("h1", "criu"),
                ("h2", "runtime"),
                ("h2", "disk"),
                ("h2", "name"),
                ("h2", "address"),
                ("h2", "ports")
            ]
        );
        assert!(findings
            .iter()
            .filter(|f| f.severity != Severity::Ok)
            .all(|f| f.fix.is_some()));
        let error = refuse_on_problems(&findings).unwrap_err().to_string();
        assert!(error.contains("podman rm -f web"), "{error}");
    }
}
