//! The iperf3 harness (binary `harness`): what a client sees during a migration, by
//! live-migrate and by plain `podman container checkpoint/restore`, plus the memory
//! sensitivity sweep, the echo-outage statistics and the forwarded path's throughput. See the README, "Performance".

pub mod analysis;
pub mod forwarded;
pub mod plot;
pub mod runs;
pub mod summary;
