//! CRIU facts: for preflight checks, and what a checkpoint cost. CRIU has no library
//! interface for its version or its self-check, so this runs `criu --version` and `criu
//! check` (fixed arguments, no shell). Its statistics are the `stats-dump` image it writes
//! beside a checkpoint (protobuf, `images/stats.proto` in CRIU).

/// Oldest CRIU that can dump TCP sockets on Linux >= 6.16 (criu issue #2705).
pub const MIN_VERSION: (u32, u32) = (4, 2);

/// The installed CRIU version, e.g. "4.2.1", or a description of why there is none.
pub async fn version() -> Result<String, String> {
    let output = tokio::process::Command::new("criu")
        .arg("--version")
        .output()
        .await
        .map_err(|e| format!("criu not found ({e}); install CRIU >= 4.2"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| format!("unexpected output of criu --version: {text}"))
}

/// Optional features worth knowing about: pre-copy needs dirty-page tracking, lazy pages
/// need non-cooperative userfaultfd. Neither is needed by the current migration.
pub const OPTIONAL_FEATURES: [&str; 2] = ["mem_dirty_track", "uffd-noncoop"];

/// Runs `criu check`: `None` when CRIU finds this host fit to checkpoint, otherwise what it
/// objected to.
pub async fn check() -> Option<String> {
    let output = match tokio::process::Command::new("criu")
        .arg("check")
        .output()
        .await
    {
        Ok(output) => output,
        Err(e) => return Some(format!("criu not found ({e})")),
    };
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    if output.status.success() && text.contains("Looks good") {
        return None;
    }
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("Error")).collect();
    Some(if errors.is_empty() {
        text.trim().to_string()
    } else {
        errors.join("; ")
    })
}

/// Whether this kernel and CRIU support an optional `feature` (`criu check --feature`).
pub async fn has_feature(feature: &str) -> bool {
    tokio::process::Command::new("criu")
        .args(["check", "--feature", feature])
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

/// Whether `version` ("major.minor[.patch]") is at least [`MIN_VERSION`].
pub fn is_supported(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= MIN_VERSION
}

/// How long CRIU kept a checkpointed container's processes from running, from its
/// `stats-dump` (microseconds there).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DumpTimes {
    /// From asking the processes to freeze until all were frozen.
    pub freezing_ms: f64,
    /// From then until the dump was written.
    pub frozen_ms: f64,
    /// Of the frozen time: collecting, then writing, the memory pages.
    pub memdump_ms: f64,
    pub memwrite_ms: f64,
    /// Pages written into the images.
    pub pages_written: Option<u64>,
}

/// `StatsEntry` of CRIU's `stats.proto`: a `stats-dump` holds the dump's part, a
/// `stats-restore` the restore's.
#[derive(Clone, PartialEq, prost::Message)]
struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    dump: Option<DumpStatsEntry>,
    #[prost(message, optional, tag = "2")]
    restore: Option<RestoreStatsEntry>,
}

/// `RestoreStatsEntry` of CRIU's `stats.proto`; only the restore's duration is read.
#[derive(Clone, PartialEq, prost::Message)]
struct RestoreStatsEntry {
    #[prost(uint32, required, tag = "4")]
    restore_time: u32,
}

/// The file in which CRIU's restore leaves its statistics, in its work directory.
pub const RESTORE_STATS: &str = "stats-restore";

/// `DumpStatsEntry` of CRIU's `stats.proto`: the times, in microseconds.
#[derive(Clone, PartialEq, prost::Message)]
struct DumpStatsEntry {
    #[prost(uint32, required, tag = "1")]
    freezing_time: u32,
    #[prost(uint32, required, tag = "2")]
    frozen_time: u32,
    #[prost(uint32, required, tag = "3")]
    memdump_time: u32,
    #[prost(uint32, required, tag = "4")]
    memwrite_time: u32,
    #[prost(uint64, optional, tag = "7")]
    pages_written: Option<u64>,
}

/// CRIU image files start with magic numbers: a common or service one, then the image's.
const IMG_COMMON_MAGIC: u32 = 0x5476_4319;
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;

/// Decodes a statistics image: magic numbers, then one entry (u32 length, protobuf).
fn stats_entry(image: &[u8]) -> Option<StatsEntry> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
    };
    let mut at = 4;
    if matches!(word(0)?, IMG_COMMON_MAGIC | IMG_SERVICE_MAGIC) {
        at += 4;
    }
    let len = word(at)? as usize;
    let entry = image.get(at + 4..at + 4 + len)?;
    <StatsEntry as prost::Message>::decode(entry).ok()
}

/// How long CRIU's restore took, microseconds, from its `stats-restore` image.
pub fn restore_time_us(image: &[u8]) -> Option<u64> {
    Some(stats_entry(image)?.restore?.restore_time.into())
}

/// Decodes a `stats-dump` image.
pub fn dump_times(image: &[u8]) -> Option<DumpTimes> {
    let dump = stats_entry(image)?.dump?;
    let ms = |us: u32| f64::from(us) / 1e3;
    Some(DumpTimes {
        freezing_ms: ms(dump.freezing_time),
        frozen_ms: ms(dump.frozen_time),
        memdump_ms: ms(dump.memdump_time),
        memwrite_ms: ms(dump.memwrite_time),
        pages_written: dump.pages_written,
    })
}

/// The dump times in a checkpoint archive exported by podman (its `stats-dump`), if any.
/// Reads the archive's headers only, up to that file.
pub fn dump_times_in_archive(archive: &std::path::Path) -> Option<DumpTimes> {
    use std::io::Read;
    let mut archive = tar::Archive::new(std::fs::File::open(archive).ok()?);
    for entry in archive.entries_with_seek().ok()? {
        let mut entry = entry.ok()?;
        if entry.path().ok()?.file_name() == Some(std::ffi::OsStr::new("stats-dump")) {
            let mut image = Vec::new();
            entry.read_to_end(&mut image).ok()?;
            return dump_times(&image);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_times_are_read_from_a_stats_image() {
        let entry = StatsEntry {
            dump: Some(DumpStatsEntry {
                freezing_time: 100_250,
                frozen_time: 46_000,
                memdump_time: 3_000,
                memwrite_time: 2_000,
                pages_written: Some(20),
            }),
            restore: None,
        };
        let body = prost::Message::encode_to_vec(&entry);
        let mut image = Vec::new();
        image.extend(IMG_SERVICE_MAGIC.to_le_bytes());
        image.extend(0x5709_3306u32.to_le_bytes()); // STATS_MAGIC
        image.extend((body.len() as u32).to_le_bytes());
        image.extend(body);
        let times = dump_times(&image).unwrap();
        assert_eq!((times.freezing_ms, times.frozen_ms), (100.25, 46.0));
        assert_eq!(times.pages_written, Some(20));
        assert_eq!(dump_times(&image[..10]), None);
        assert_eq!(restore_time_us(&image), None);
    }

    #[test]
    fn the_restore_time_is_read_from_a_stats_restore_image() {
        // A lazy restore's stats-restore, written by CRIU 4.2.1 here: 42,925 us.
        let image = [
            0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x0e, 0x00, 0x00, 0x00, 0x12, 0x0c,
            0x08, 0x00, 0x10, 0x00, 0x18, 0x03, 0x20, 0xad, 0xcf, 0x02, 0x28, 0x14,
        ];
        assert_eq!(restore_time_us(&image), Some(42_925));
        assert_eq!(dump_times(&image), None);
    }

    #[test]
    fn version_gate() {
        assert!(is_supported("4.2.1"));
        assert!(is_supported("5.0"));
        assert!(!is_supported("4.1.1"));
        assert!(!is_supported("3.17"));
        assert!(!is_supported("garbage"));
    }
}
