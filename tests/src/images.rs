//! Container images for the lab.
//!
//! There is no registry. The workloads are rootfs tarballs built by
//! `containers/build-images.sh` with metadata in `containers/<name>/image.json`. They are
//! `podman import`ed into ONE host, `podman save`d to an archive and `podman load`ed into
//! the others: `podman import` stamps a creation time into the image config, so importing
//! into each host separately would give every host a different image id, and a checkpoint
//! restored on another host must find the very same image there.
//!
//! The saved archive is cached in the images directory together with a stamp of the
//! tarballs it came from; later labs just load it into every host in parallel.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::cmd;
use crate::host::nsenter;
use crate::plan::HostDescription;

/// A port a workload listens on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub port: u16,
    /// `tcp` or `udp`.
    pub proto: String,
}

/// `containers/<name>/image.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ImageMeta {
    pub name: String,
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub description: String,
}

impl ImageMeta {
    /// The image reference inside hosts: `localhost/<name>`.
    pub fn reference(&self) -> String {
        format!("localhost/{}", self.name)
    }

    /// The name of the image that `reference` (`NAME` or `localhost/NAME`) names: the lab's
    /// images all live in `localhost/`.
    pub fn name_in(reference: &str) -> Result<String> {
        let name = reference.strip_prefix("localhost/").unwrap_or(reference);
        if name.is_empty() || name.contains('/') {
            bail!("image {reference:?}: give NAME or localhost/NAME (the lab's images live in localhost/)");
        }
        Ok(name.to_string())
    }

    /// `--change` arguments for `podman import`. The `INSTRUCTION VALUE` form (not
    /// `INSTRUCTION=VALUE`): podman cuts the instruction at the first white space, so
    /// `CMD=["sh","-c","a b"]` would be rejected.
    pub fn import_changes(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.cmd.is_empty() {
            v.push(format!(
                "CMD {}",
                serde_json::to_string(&self.cmd).expect("strings serialise")
            ));
        }
        for (k, val) in &self.env {
            v.push(format!("ENV {k}={val}"));
        }
        for p in &self.ports {
            v.push(format!("EXPOSE {}/{}", p.port, p.proto));
        }
        v
    }
}

/// A rootfs tarball and how to turn it into an image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ImageSource {
    pub meta: ImageMeta,
    pub tarball: PathBuf,
}

/// The workspace root (for `containers/` and `target/`): `$LM_WORKSPACE`, else the parent
/// of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    if let Some(w) = std::env::var_os("LM_WORKSPACE") {
        return PathBuf::from(w);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Where built images go: `<workspace>/target/images` (honouring `CARGO_TARGET_DIR`).
pub fn images_dir(workspace: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t).join("images"),
        None => workspace.join("target/images"),
    }
}

/// Every `containers/*/image.json`, sorted by name.
pub fn workload_metas(workspace: &Path) -> Result<Vec<ImageMeta>> {
    let dir = workspace.join("containers");
    let mut metas = Vec::new();
    for e in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path().join("image.json");
        if p.is_file() {
            let text = fs::read_to_string(&p)?;
            let m: ImageMeta =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
            metas.push(m);
        }
    }
    metas.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(metas)
}

/// An exclusive `flock` on a file, released on drop: parallel tests and several test
/// processes share one images directory.
pub struct FileLock {
    _lock: Flock<fs::File>,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<FileLock> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("flock {}", path.display()))?;
        Ok(FileLock { _lock: lock })
    }
}

/// Builds the workload tarballs once per process (the script itself only rewrites
/// tarballs whose content changed) and returns them with their metadata.
///
/// Set `LM_SKIP_IMAGE_BUILD=1` to use existing tarballs as they are (for example when the
/// caller runs under `cargo test`, which may hold cargo's build lock that the script's own
/// `cargo build` would wait for).
pub fn build_workloads(workspace: &Path) -> Result<Vec<ImageSource>> {
    static BUILT: Mutex<bool> = Mutex::new(false);
    let out = images_dir(workspace);
    fs::create_dir_all(&out)?;
    let metas = workload_metas(workspace)?;
    {
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        let skip = std::env::var_os("LM_SKIP_IMAGE_BUILD").is_some_and(|v| v != "0");
        if !*built && !skip {
            let _lock = FileLock::acquire(&out.join(".build.lock"))?;
            let script = workspace.join("containers/build-images.sh");
            cmd::output(Command::new("bash").arg(&script).arg(&out))
                .context("building workload images")?;
            *built = true;
        }
    }
    metas
        .into_iter()
        .map(|meta| {
            let tarball = out.join(format!("{}.tar", meta.name));
            if !tarball.is_file() {
                bail!("{} missing after build-images.sh", tarball.display());
            }
            Ok(ImageSource { meta, tarball })
        })
        .collect()
}

/// Identity of a set of sources: their metadata and the size/mtime of each tarball.
fn stamp(sources: &[ImageSource]) -> Result<String> {
    let mut v = Vec::new();
    for s in sources {
        let m =
            fs::metadata(&s.tarball).with_context(|| format!("reading {}", s.tarball.display()))?;
        v.push(serde_json::json!({
            "meta": s.meta,
            "tarball": s.tarball,
            "size": m.len(),
            "mtime": [m.mtime(), m.mtime_nsec()],
        }));
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

fn podman(host: &HostDescription, args: &[&str]) -> Command {
    let mut c = nsenter(&host.ns);
    c.arg("podman").args(args);
    c
}

/// `podman import`s every source into `host`.
pub fn import(host: &HostDescription, sources: &[ImageSource]) -> Result<()> {
    for s in sources {
        let mut c = podman(host, &["import", "--quiet"]);
        for ch in s.meta.import_changes() {
            c.arg("--change").arg(ch);
        }
        c.arg(&s.tarball).arg(s.meta.reference());
        cmd::run(&mut c)
            .with_context(|| format!("importing {} into {}", s.meta.name, host.name))?;
    }
    Ok(())
}

/// `podman save`s the sources' images from `host` into one docker-archive at `archive`
/// (written to a temporary name first so a reader never sees half an archive).
pub fn save(host: &HostDescription, sources: &[ImageSource], archive: &Path) -> Result<()> {
    let tmp = archive.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut c = podman(
        host,
        &[
            "save",
            "--quiet",
            "--multi-image-archive",
            "--format",
            "docker-archive",
            "--output",
        ],
    );
    c.arg(&tmp);
    for s in sources {
        c.arg(s.meta.reference());
    }
    cmd::run(&mut c).with_context(|| format!("saving images from {}", host.name))?;
    fs::rename(&tmp, archive)?;
    Ok(())
}

/// `podman load`s `archive` into each of `hosts`, in parallel.
pub fn load(hosts: &[&HostDescription], archive: &Path) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|h| {
                s.spawn(move || {
                    let mut c = podman(h, &["load", "--quiet", "--input"]);
                    c.arg(archive);
                    cmd::run(&mut c).with_context(|| format!("loading images into {}", h.name))
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))?
        })
    })
}

/// Makes `sources` available with identical image ids on every host.
///
/// With `cache_dir`, the saved archive is kept there (keyed by [`stamp`]) and reused by
/// later labs; otherwise it is written to `scratch` and left for the caller to remove.
pub fn distribute(
    hosts: &[HostDescription],
    sources: &[ImageSource],
    cache_dir: Option<&Path>,
    scratch: &Path,
) -> Result<()> {
    let Some((first, rest)) = hosts.split_first() else {
        return Ok(());
    };
    if sources.is_empty() {
        return Ok(());
    }
    let Some(cache) = cache_dir else {
        import(first, sources)?;
        let archive = scratch.join("images.tar");
        save(first, sources, &archive)?;
        return load(&rest.iter().collect::<Vec<_>>(), &archive);
    };
    fs::create_dir_all(cache)?;
    let archive = cache.join("lab-images.tar");
    let stamp_file = cache.join("lab-images.stamp");
    let _lock = FileLock::acquire(&cache.join(".lab-images.lock"))?;
    let want = stamp(sources)?;
    let fresh = archive.is_file() && fs::read_to_string(&stamp_file).ok().as_deref() == Some(&want);
    if fresh {
        return load(&hosts.iter().collect::<Vec<_>>(), &archive);
    }
    import(first, sources)?;
    let _ = fs::remove_file(&stamp_file);
    save(first, sources, &archive)?;
    fs::write(&stamp_file, want)?;
    load(&rest.iter().collect::<Vec<_>>(), &archive)
}

/// The image id of `reference` in `host`.
pub fn image_id(host: &HostDescription, reference: &str) -> Result<String> {
    let out = cmd::output(&mut podman(
        host,
        &["image", "inspect", "--format", "{{.Id}}", reference],
    ))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Writes a minimal busybox rootfs tarball to `out` (static `/bin/busybox` and its applet
/// links, /tmp, /etc/passwd): a tiny image for tests that do not need the workloads.
pub fn busybox_rootfs_tar(out: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox not found (apt-get install busybox-static)");
    }
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "run", "var", "root"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::create_dir_all(root.join("tmp"))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::copy(busybox, root.join("bin/busybox"))?;
    let list = cmd::output(Command::new(busybox).arg("--list"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    cmd::run(
        Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(out)
            .arg("."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_changes_follow_image_json() {
        let m: ImageMeta = serde_json::from_str(
            r#"{"name":"tcp-echo","cmd":["/bin/tcp-echo","-v"],"env":{"PORT":"5000","A":"b c"},
                "ports":[{"port":5000,"proto":"tcp"}],"description":"x"}"#,
        )
        .unwrap();
        assert_eq!(m.reference(), "localhost/tcp-echo");
        for given in ["mytool", "localhost/mytool"] {
            assert_eq!(ImageMeta::name_in(given).unwrap(), "mytool", "{given}");
        }
        assert!(ImageMeta::name_in("docker.io/library/mytool").is_err());
        assert_eq!(
            m.import_changes(),
            [
                r#"CMD ["/bin/tcp-echo","-v"]"#,
                "ENV A=b c",
                "ENV PORT=5000",
                "EXPOSE 5000/tcp"
            ]
        );
    }

    #[test]
    fn workload_metadata_parses() {
        // The real files, if the containers/ directory is there.
        let ws = workspace_root();
        if ws.join("containers").is_dir() {
            let metas = workload_metas(&ws).unwrap();
            assert!(metas
                .iter()
                .all(|m| !m.name.is_empty() && !m.cmd.is_empty()));
        }
    }
}
