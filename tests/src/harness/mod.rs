//! The iperf3 harness (binary `harness`): what a client sees during a migration, by
//! live-migrate and by plain `podman container checkpoint/restore`, plus the memory
//! sensitivity sweep and the echo-outage statistics. See the README, "Performance".

pub mod analysis;
pub mod plot;
pub mod runs;
pub mod summary;
