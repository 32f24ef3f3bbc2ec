//! Parsing iperf3's JSON (client and `--get-server-output`) and the per-migration numbers.

use serde::Serialize;
use serde_json::Value;

/// One reporting interval of one direction, as seen by one end.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Interval start and end, seconds since the test started.
    pub start: f64,
    pub end: f64,
    pub bytes: u64,
    pub mbps: f64,
    pub retransmits: Option<u64>,
    pub lost_packets: Option<u64>,
    pub packets: Option<u64>,
    pub jitter_ms: Option<f64>,
}

/// Both directions from both ends. `up` is client -> server, `down` server -> client.
/// `*_recv` is what the receiving end counted (bytes delivered), `*_sent` what the sender
/// counted (retransmits live there).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Series {
    pub up_recv: Vec<Sample>,
    pub up_sent: Vec<Sample>,
    pub down_recv: Vec<Sample>,
    pub down_sent: Vec<Sample>,
}

impl Series {
    /// The series the client observes for a direction: what it sent (up) and what it
    /// received (down). The client's clock is never frozen, unlike the server's inside the
    /// container, whose intervals are distorted by the checkpoint. Falls back to the other
    /// end when missing.
    pub fn delivered(&self, up: bool) -> &[Sample] {
        // UDP is sent at a fixed rate whatever happens to it: what the client sends up
        // says nothing, so that direction is taken from the server's receive side.
        let udp_up = up && self.up_recv.iter().any(|x| x.lost_packets.is_some());
        let (mine, other) = if up && !udp_up {
            (&self.up_sent, &self.up_recv)
        } else if up {
            (&self.up_recv, &self.up_sent)
        } else {
            (&self.down_recv, &self.down_sent)
        };
        if mine.is_empty() {
            other
        } else {
            mine
        }
    }

    pub fn bidirectional(&self) -> bool {
        !self.down_recv.is_empty() || !self.down_sent.is_empty()
    }
}

fn sample(v: &Value) -> Option<Sample> {
    Some(Sample {
        start: v["start"].as_f64()?,
        end: v["end"].as_f64()?,
        bytes: v["bytes"].as_u64().unwrap_or(0),
        mbps: v["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        retransmits: v["retransmits"].as_u64(),
        lost_packets: v["lost_packets"].as_u64(),
        packets: v["packets"].as_u64(),
        jitter_ms: v["jitter_ms"].as_f64(),
    })
}

/// Adds the intervals of one end. `client` tells which end wrote `doc`: the client sends
/// `up`, the server sends `down`.
fn add_end(series: &mut Series, doc: &Value, client: bool) {
    let Some(intervals) = doc["intervals"].as_array() else {
        return;
    };
    for iv in intervals {
        for key in ["sum", "sum_bidir_reverse"] {
            let v = &iv[key];
            if v.is_null() {
                continue;
            }
            let Some(s) = sample(v) else { continue };
            let sender = v["sender"].as_bool().unwrap_or(key == "sum");
            // The client sends up; the server sends down.
            let up = sender == client;
            let target = match (up, sender) {
                (true, true) => &mut series.up_sent,
                (true, false) => &mut series.up_recv,
                (false, true) => &mut series.down_sent,
                (false, false) => &mut series.down_recv,
            };
            target.push(s);
        }
    }
}

/// Parsed iperf3 client output.
#[derive(Clone, Debug, Serialize)]
pub struct IperfResult {
    pub series: Series,
    /// iperf3's own error, if it reported one.
    pub error: Option<String>,
    /// Whether the end-of-test results were exchanged (server output present).
    pub completed: bool,
}

pub fn parse_iperf(doc: &Value) -> IperfResult {
    let mut series = Series::default();
    add_end(&mut series, doc, true);
    let server = &doc["server_output_json"];
    if server.is_object() {
        add_end(&mut series, server, false);
    }
    IperfResult {
        series,
        error: doc["error"].as_str().map(str::to_string),
        completed: doc["end"]["sum_sent"].is_object() || doc["end"]["sum"].is_object(),
    }
}

/// Outage of one direction around one migration and what surrounds it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DirectionStats {
    /// Longest run of consecutive intervals that delivered no byte, overlapping the
    /// migration window (± slack); ms. If traffic never came back, up to the test's end.
    pub outage_ms: f64,
    /// Where that run starts, seconds since the test started.
    pub outage_start_s: Option<f64>,
    /// Whether bytes flowed again after the migration.
    pub resumed: bool,
    /// Mean throughput over the 2 s before the migration started / after it ended.
    pub mbps_before: f64,
    pub mbps_after: f64,
    /// TCP: retransmits counted by the sender from 1 s before to 3 s after the migration.
    pub retransmits: Option<u64>,
    /// UDP: datagrams lost and the worst jitter in the same window (receiver side).
    pub lost_packets: Option<u64>,
    pub jitter_ms_max: Option<f64>,
}

fn mean_mbps(s: &[Sample], from: f64, to: f64) -> f64 {
    let (mut bytes, mut secs) = (0u64, 0f64);
    for x in s
        .iter()
        .filter(|x| x.start >= from - 1e-6 && x.end <= to + 1e-6)
    {
        bytes += x.bytes;
        secs += x.end - x.start;
    }
    if secs > 0.0 {
        bytes as f64 * 8.0 / secs / 1e6
    } else {
        0.0
    }
}

/// Stats of one direction for a migration over `[m_start, m_end]` (seconds since the test
/// started); `test_end` is the planned test length.
pub fn direction_stats(
    series: &Series,
    up: bool,
    m_start: f64,
    m_end: f64,
    test_end: f64,
) -> DirectionStats {
    let delivered = series.delivered(up);
    let sent = if up {
        &series.up_sent
    } else {
        &series.down_sent
    };
    let mut st = DirectionStats {
        mbps_before: mean_mbps(delivered, m_start - 2.0, m_start),
        mbps_after: mean_mbps(delivered, m_end, m_end + 2.0),
        ..Default::default()
    };
    // Runs of zero-byte intervals; the test ending early counts as a run to `test_end`.
    // A frozen iperf3 (the server inside the container) reports one stretched interval
    // once it runs again: all but its last nominal stretch delivered nothing.
    let mut lens: Vec<f64> = delivered.iter().map(|x| x.end - x.start).collect();
    lens.sort_by(f64::total_cmp);
    let nominal = lens.get(lens.len() / 2).copied().unwrap_or(0.1);
    let mut split: Vec<Sample> = Vec::with_capacity(delivered.len());
    for x in delivered {
        if x.end - x.start > 1.5 * nominal {
            let cut = x.end - nominal;
            split.push(Sample {
                end: cut,
                bytes: 0,
                ..x.clone()
            });
            split.push(Sample {
                start: cut,
                ..x.clone()
            });
        } else {
            split.push(x.clone());
        }
    }
    let mut runs: Vec<(f64, f64)> = Vec::new();
    let mut cur: Option<(f64, f64)> = None;
    for x in &split {
        if x.bytes == 0 {
            cur = Some(match cur {
                Some((s, _)) => (s, x.end),
                None => (x.start, x.end),
            });
        } else if let Some(r) = cur.take() {
            runs.push(r);
        }
    }
    let last_end = delivered.last().map_or(0.0, |x| x.end);
    match cur {
        Some((s, _)) => runs.push((s, test_end.max(last_end))),
        None if last_end + 0.5 < test_end => runs.push((last_end, test_end)),
        None => {}
    }
    let (lo, hi) = (m_start - 0.5, m_end + 2.0);
    if let Some(&(s, e)) = runs
        .iter()
        .filter(|(s, e)| *e >= lo && *s <= hi)
        .max_by(|a, b| (a.1 - a.0).total_cmp(&(b.1 - b.0)))
    {
        st.outage_ms = (e - s) * 1000.0;
        st.outage_start_s = Some(s);
    }
    st.resumed = delivered.iter().any(|x| x.start >= m_end && x.bytes > 0);
    let (wlo, whi) = (m_start - 1.0, m_end + 3.0);
    let in_window = |x: &&Sample| x.end > wlo && x.start < whi;
    if sent.iter().any(|x| x.retransmits.is_some()) {
        st.retransmits = Some(
            sent.iter()
                .filter(in_window)
                .filter_map(|x| x.retransmits)
                .sum(),
        );
    }
    let recv = if up {
        &series.up_recv
    } else {
        &series.down_recv
    };
    if recv.iter().any(|x| x.lost_packets.is_some()) {
        st.lost_packets = Some(
            recv.iter()
                .filter(in_window)
                .filter_map(|x| x.lost_packets)
                .sum(),
        );
        st.jitter_ms_max = recv
            .iter()
            .filter(in_window)
            .filter_map(|x| x.jitter_ms)
            .max_by(f64::total_cmp);
    }
    st
}

/// Median, 95th percentile and maximum of repeated measurements, ms.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Spread {
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
    pub n: usize,
}

/// The [`Spread`] of `v` (None when empty). The median of an even count is the mean of the
/// middle two; the 95th percentile is the nearest rank (the value at rank ceil(0.95 n)).
pub fn spread(v: &[f64]) -> Option<Spread> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let p50 = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    let rank = (0.95 * n as f64).ceil() as usize;
    Some(Spread {
        p50,
        p95: s[rank.clamp(1, n) - 1],
        max: s[n - 1],
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(start: f64, bytes: u64) -> Sample {
        Sample {
            start,
            end: start + 0.1,
            bytes,
            mbps: bytes as f64 * 8.0 / 0.1 / 1e6,
            retransmits: Some(1),
            lost_packets: None,
            packets: None,
            jitter_ms: None,
        }
    }

    #[test]
    fn outage_is_the_zero_run_near_the_migration() {
        let mut series = Series::default();
        for i in 0..50 {
            let t = i as f64 / 10.0;
            let bytes = if (2.0..2.3).contains(&t) || (3.0..3.8).contains(&t) {
                0
            } else {
                1000
            };
            series.up_sent.push(s(t, bytes));
        }
        let st = direction_stats(&series, true, 2.9, 3.5, 5.0);
        assert!((st.outage_ms - 800.0).abs() < 1.0, "{st:?}");
        assert!(st.resumed);
        assert!(st.retransmits.unwrap() > 0);
        let three = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((three.p50, three.p95, three.max), (2.0, 3.0, 3.0));
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        let twenty = spread(&twenty).unwrap();
        assert_eq!((twenty.p50, twenty.p95, twenty.max), (10.5, 19.0, 20.0));
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn stretched_interval_of_a_frozen_end_counts_as_outage() {
        let mut series = Series::default();
        for i in 0..20 {
            series.up_sent.push(s(i as f64 / 10.0, 1000));
        }
        let mut long = s(2.0, 5000);
        long.end = 2.9;
        series.up_sent.push(long);
        for i in 29..40 {
            series.up_sent.push(s(i as f64 / 10.0, 1000));
        }
        let st = direction_stats(&series, true, 1.9, 3.0, 4.0);
        assert!((st.outage_ms - 800.0).abs() < 1.0, "{st:?}");
    }

    #[test]
    fn broken_test_counts_to_the_end() {
        let mut series = Series::default();
        for i in 0..20 {
            series.up_sent.push(s(i as f64 / 10.0, 1000));
        }
        let st = direction_stats(&series, true, 1.9, 2.5, 6.0);
        assert!(!st.resumed);
        assert!((st.outage_ms - 4000.0).abs() < 1.0, "{st:?}");
    }
}
