//! The container engine, through the Podman REST API of one host.
//!
//! Everything goes through `podman-api`, except the two calls that upload an archive
//! (restore from a checkpoint, load an image): those stream it from a file
//! ([`PodmanClient::post_archive`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures_util::{StreamExt, TryStreamExt};
use podman_api::opts::{
    ContainerCheckpointOpts, ContainerDeleteOpts, ContainerListOpts, ContainerRestoreOpts,
    ContainerStatsOpts,
};
use podman_api::Podman;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::protocol::{ContainerRef, Proto, PublishedPort};

/// Default path of the rootful Podman service socket.
pub const DEFAULT_SOCKET: &str = "/run/podman/podman.sock";

#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("podman at {socket}: {message}")]
    Api { socket: String, message: String },
}

/// What an operator and the migration need to know about a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub image_id: String,
    pub image_name: String,
    pub running: bool,
    /// Its cgroup, as podman reports it (e.g. `/libpod_parent/libpod-<id>`).
    pub cgroup_path: Option<String>,
    /// Addresses on each container network, by network name.
    pub addresses: BTreeMap<String, String>,
    /// Published ports as `host_port -> container_port/proto`.
    pub published_ports: Vec<PublishedPort>,
    /// Its init process (host PID), while it runs.
    #[serde(default)]
    pub pid: Option<i32>,
    /// Podman's directory for it (`config.json`, and the images of a checkpoint).
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// The overlay's upper directory: its changes to the image.
    #[serde(default)]
    pub upper_dir: Option<PathBuf>,
    /// Its IPv4 attachments, as `network.status` of an archive needs them.
    #[serde(default)]
    pub networks: Vec<crate::engine::lazy_pages::NetworkAttachment>,
    /// The CRIU configuration its annotation `org.criu.config` names (runc then reads it
    /// in place of `/etc/criu/runc.conf`).
    #[serde(default)]
    pub criu_config: Option<PathBuf>,
}

impl ContainerInfo {
    /// The container's IPv4 address, if it has one (the first network's).
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.addresses.values().find_map(|a| a.parse().ok())
    }

    pub fn to_ref(&self) -> ContainerRef {
        ContainerRef {
            id: self.id.clone(),
            name: self.name.clone(),
            image_id: self.image_id.clone(),
            image_name: self.image_name.clone(),
            address: self.ipv4(),
            published_ports: self.published_ports.clone(),
        }
    }
}

/// Engine facts used by preflight checks.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub podman_version: String,
    pub oci_runtime: String,
}

#[derive(Clone)]
pub struct PodmanClient {
    api: Podman,
    socket: PathBuf,
}

impl PodmanClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            api: Podman::unix(socket),
            socket: socket.to_path_buf(),
        }
    }

    fn error(&self, context: &str, e: impl std::fmt::Display) -> PodmanError {
        PodmanError::Api {
            socket: self.socket.display().to_string(),
            message: format!("{context}: {e}"),
        }
    }

    /// podman's version as its `_ping` names it: a millisecond, where `/info` and
    /// `/version` take a third of a second or more ([`super::kept_info`]).
    pub async fn pinged_version(&self) -> Result<String, PodmanError> {
        let ping = self
            .api
            .ping()
            .await
            .map_err(|e| self.error("cannot reach the podman service", e))?;
        Ok(ping.libpod_api_version)
    }

    /// podman's own answer (`/info`); [`super::kept_info::engine_info`] keeps it.
    pub async fn engine_info(&self) -> Result<EngineInfo, PodmanError> {
        let info = self
            .api
            .info()
            .await
            .map_err(|e| self.error("cannot reach the podman service", e))?;
        Ok(EngineInfo {
            podman_version: info.version.and_then(|v| v.version).unwrap_or_default(),
            oci_runtime: info
                .host
                .and_then(|h| h.oci_runtime)
                .and_then(|r| r.name)
                .unwrap_or_default(),
        })
    }

    pub async fn inspect(&self, name_or_id: &str) -> Result<ContainerInfo, PodmanError> {
        let container = self.api.containers().get(name_or_id);
        let data = container.inspect().await.map_err(|e| {
            if is_not_found(&e) {
                PodmanError::NoSuchContainer(name_or_id.to_string())
            } else {
                self.error(&format!("inspect {name_or_id}"), e)
            }
        })?;
        let (networks, ports) = data
            .network_settings
            .map(|n| (n.networks, n.ports))
            .unwrap_or_default();
        let networks = networks.unwrap_or_default();
        let attachments = networks
            .iter()
            .filter_map(|(network, n)| {
                Some(crate::engine::lazy_pages::NetworkAttachment {
                    network: network.clone(),
                    address: n.ip_address.as_deref()?.parse().ok()?,
                    prefix_len: u8::try_from(n.ip_prefix_len?).ok()?,
                    gateway: n.gateway.as_deref().and_then(|g| g.parse().ok()),
                    mac: n.mac_address.clone()?,
                })
            })
            .collect();
        let addresses = networks
            .into_iter()
            .filter_map(|(net, settings)| {
                settings
                    .ip_address
                    .filter(|ip| !ip.is_empty())
                    .map(|ip| (net, ip))
            })
            .collect();
        let mut published_ports = Vec::new();
        for (spec, bindings) in ports.unwrap_or_default() {
            let (port, protocol) = spec.split_once('/').unwrap_or((&spec, "tcp"));
            let Ok(container_port) = port.parse() else {
                continue;
            };
            // The agent moves TCP and UDP flows only: an SCTP port is neither checked nor
            // forwarded.
            let Ok(protocol) = protocol.parse::<Proto>() else {
                tracing::warn!(container = %data.name.as_deref().unwrap_or_default(), "published port {spec} is not TCP or UDP: left out");
                continue;
            };
            for binding in bindings.unwrap_or_default() {
                if let Some(Ok(host_port)) = binding.host_port.as_deref().map(str::parse) {
                    published_ports.push(PublishedPort {
                        host_port,
                        container_port,
                        protocol,
                    });
                }
            }
        }
        published_ports.sort_by_key(|p| (p.host_port, p.protocol));
        let upper_dir = data
            .graph_driver
            .as_ref()
            .and_then(|g| g.data.as_ref())
            .and_then(|d| d.get("UpperDir"))
            .map(PathBuf::from);
        let bundle = data
            .oci_config_path
            .as_deref()
            .and_then(|p| Path::new(p).parent())
            .map(Path::to_path_buf);
        let criu_config = data
            .config
            .as_ref()
            .and_then(|c| c.annotations.as_ref())
            .and_then(|a| a.get(crate::engine::lazy_pages::CONFIG_ANNOTATION))
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let pid = data
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .and_then(|p| i32::try_from(p).ok())
            .filter(|&p| p > 0);
        Ok(ContainerInfo {
            id: data.id.unwrap_or_default(),
            name: data.name.unwrap_or_default(),
            image_id: data.image.unwrap_or_default(),
            image_name: data.image_name.unwrap_or_default(),
            running: data.state.as_ref().and_then(|s| s.running).unwrap_or(false),
            cgroup_path: data
                .state
                .and_then(|s| s.cgroup_path)
                .filter(|p| !p.is_empty()),
            addresses,
            published_ports,
            pid,
            bundle,
            upper_dir,
            networks: attachments,
            criu_config,
        })
    }

    /// Inspects a container that must exist and be running.
    pub async fn inspect_running(&self, name_or_id: &str) -> Result<ContainerInfo, PodmanError> {
        let info = self.inspect(name_or_id).await?;
        if !info.running {
            return Err(PodmanError::NotRunning(name_or_id.to_string()));
        }
        Ok(info)
    }

    pub async fn list_running(&self) -> Result<Vec<ContainerInfo>, PodmanError> {
        let list = self
            .api
            .containers()
            .list(&ContainerListOpts::builder().all(false).build())
            .await
            .map_err(|e| self.error("list containers", e))?;
        let mut out = Vec::new();
        for c in list {
            if let Some(id) = c.id {
                out.push(self.inspect(&id).await?);
            }
        }
        Ok(out)
    }

    /// Memory the container uses now, in bytes (podman's stats); `None` if podman does not
    /// say.
    pub async fn memory_usage(&self, id: &str) -> Result<Option<u64>, PodmanError> {
        let stats = self
            .api
            .containers()
            .stats(
                &ContainerStatsOpts::builder()
                    .containers([id.to_string()])
                    .build(),
            )
            .await
            .map_err(|e| self.error(&format!("stats of {id}"), e))?;
        // The crate types this response as bare JSON: {"Stats": [{"MemUsage": n, ...}]}.
        Ok(stats
            .get("Stats")
            .and_then(|s| s.get(0))
            .and_then(|s| s.get("MemUsage"))
            .and_then(|m| m.as_u64()))
    }

    /// Looks up a container by name or ID; `None` when there is none.
    pub async fn find(&self, name_or_id: &str) -> Result<Option<ContainerInfo>, PodmanError> {
        match self.inspect(name_or_id).await {
            Ok(info) => Ok(Some(info)),
            Err(PodmanError::NoSuchContainer(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn image_exists(&self, image_id: &str) -> Result<bool, PodmanError> {
        self.api
            .images()
            .get(image_id)
            .exists()
            .await
            .map_err(|e| self.error(&format!("look up image {image_id}"), e))
    }

    /// The image as an archive `podman load` accepts. Images of migrated containers are
    /// small next to memory, and the transfer happens before the freeze, so memory is fine.
    pub async fn export_image(&self, reference: &str) -> Result<Vec<u8>, PodmanError> {
        self.api
            .images()
            .get(reference)
            .export(&Default::default())
            .try_concat()
            .await
            .map_err(|e| self.error(&format!("export image {reference}"), e))
    }

    /// Loads the image archive at `archive`, streamed from the file: it may be large.
    pub async fn load_image_file(&self, archive: &Path) -> Result<(), PodmanError> {
        self.post_archive("load image", "/v4.0.0/libpod/images/load", archive)
            .await
            .map(|_| ())
    }

    /// Checkpoints a running container (it stops) and writes the exported archive to
    /// `archive`; returns its size. Established TCP connections are included. `keep` leaves
    /// the checkpoint with the container too, so [`Self::restore_in_place`] can bring it back.
    pub async fn checkpoint_to_file(&self, name: &str, archive: &Path) -> Result<u64, PodmanError> {
        let opts = ContainerCheckpointOpts::builder()
            .tcp_established(true)
            .keep(true)
            .build();
        let container = self.api.containers().get(name);
        let mut stream = container.checkpoint_export(&opts);
        // It holds the container's memory: only root reads it.
        let mut file = tokio::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(archive)
            .await
            .map_err(|e| self.error(&format!("create {}", archive.display()), e))?;
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.error(&format!("checkpoint {name}"), e))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| self.error(&format!("write {}", archive.display()), e))?;
            written += chunk.len() as u64;
        }
        file.flush()
            .await
            .map_err(|e| self.error(&format!("write {}", archive.display()), e))?;
        Ok(written)
    }

    /// Restores a checkpointed container from the checkpoint it keeps on this host.
    pub async fn restore_in_place(&self, name: &str) -> Result<(), PodmanError> {
        self.api
            .containers()
            .get(name)
            .restore(
                &ContainerRestoreOpts::builder()
                    .tcp_established(true)
                    .build(),
            )
            .await
            .map(|_| ())
            .map_err(|e| self.error(&format!("restore {name}"), e))
    }

    /// Creates and starts a container from an exported checkpoint archive; returns the IDs
    /// of what podman restored from it, and what runc and CRIU took.
    pub async fn restore_import(&self, archive: &Path) -> Result<Restored, PodmanError> {
        self.import_restore(archive, true).await
    }

    /// The same for a post-copy archive, without the statistics: its CRIU writes them into
    /// the lazy-pages daemon's work directory, where podman does not look for them.
    pub async fn restore_import_lazily(&self, archive: &Path) -> Result<Restored, PodmanError> {
        self.import_restore(archive, false).await
    }

    async fn import_restore(&self, archive: &Path, stats: bool) -> Result<Restored, PodmanError> {
        let path = format!(
            "/v4.0.0/libpod/containers/import/restore?import=true&tcpEstablished=true&printStats={stats}"
        );
        let report = self
            .post_archive("restore from archive", &path, archive)
            .await?;
        let mut restored = Restored::from_report(&report);
        if !stats {
            // Without the statistics podman reports runc's time as 0, not as unknown.
            restored.runtime_us = None;
        }
        Ok(restored)
    }

    /// POSTs the file `archive` as a tar body to `path_and_query`, streamed; returns the
    /// response body. podman-api's calls for these take the archive in memory, or (for
    /// restore) send no body at all, so they use the HTTP client of `containers-api` (the
    /// transport podman-api itself is built on).
    async fn post_archive(
        &self,
        what: &str,
        path_and_query: &str,
        archive: &Path,
    ) -> Result<hyper::body::Bytes, PodmanError> {
        use containers_api::conn::{get_unix_connector, Transport};
        use hyper::{Body, Method, Request};

        let file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| self.error(&format!("open {}", archive.display()), e))?;
        let body = Body::wrap_stream(archive_chunks(file));
        let transport = Transport::Unix {
            client: hyper::Client::builder().build(get_unix_connector()),
            path: self.socket.clone(),
        };
        let uri = transport
            .make_uri(path_and_query)
            .map_err(|e| self.error(what, e))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("Content-Type", "application/x-tar")
            .body(body)
            .map_err(|e| self.error(what, e))?;
        let response = transport
            .request(request)
            .await
            .map_err(|e| self.error(what, e))?;
        let status = response.status();
        let text = hyper::body::to_bytes(response.into_body())
            .await
            .map_err(|e| self.error(what, e))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&text).into_owned());
            return Err(self.error(what, message));
        }
        Ok(text)
    }

    /// Removes a container, stopping it first if needed.
    pub async fn remove(&self, name: &str) -> Result<(), PodmanError> {
        self.api
            .containers()
            .get(name)
            .delete(&ContainerDeleteOpts::builder().force(true).build())
            .await
            .map_err(|e| self.error(&format!("remove {name}"), e))
    }
}

/// How much of an archive one chunk of a streamed request body holds at most.
const ARCHIVE_CHUNK_LEN: usize = 256 * 1024;

/// `file` as a request body: chunks of at most [`ARCHIVE_CHUNK_LEN`] bytes until its end; a
/// read error is the stream's last item.
fn archive_chunks(file: tokio::fs::File) -> tokio_util::io::ReaderStream<tokio::fs::File> {
    tokio_util::io::ReaderStream::with_capacity(file, ARCHIVE_CHUNK_LEN)
}

/// What a restore from an archive brought back, and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// The IDs of the containers restored.
    pub ids: Vec<String>,
    /// runc's restore, CRIU's included (µs).
    pub runtime_us: Option<u64>,
    /// CRIU's restore of the processes (µs).
    pub criu_us: Option<u64>,
}

impl Restored {
    /// Reads podman's restore report: one report, or a list of them (times in µs).
    fn from_report(report: &[u8]) -> Self {
        let report: serde_json::Value = serde_json::from_slice(report).unwrap_or_default();
        let reports = match report {
            serde_json::Value::Array(all) => all,
            one => vec![one],
        };
        let first = reports.first();
        Self {
            ids: reports
                .iter()
                .filter_map(|r| r.get("Id").and_then(|id| id.as_str()).map(String::from))
                .collect(),
            runtime_us: first.and_then(|r| r["runtime_restore_duration"].as_u64()),
            criu_us: first.and_then(|r| r["criu_statistics"]["restore_time"].as_u64()),
        }
    }
}

fn is_not_found(e: &podman_api::Error) -> bool {
    matches!(e, podman_api::Error::Fault { code, .. } if code.as_u16() == 404)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_archive_is_streamed_whole_in_bounded_chunks() {
        let data: Vec<u8> = (0..(2 * ARCHIVE_CHUNK_LEN + 1000) as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &data).unwrap();
        let opened = tokio::fs::File::open(file.path()).await.unwrap();
        let chunks: Vec<_> = archive_chunks(opened).try_collect().await.unwrap();
        assert!(chunks
            .iter()
            .all(|c| !c.is_empty() && c.len() <= ARCHIVE_CHUNK_LEN));
        assert_eq!(chunks.concat(), data);
    }
}
