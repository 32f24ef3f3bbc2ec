//! The container engine: podman's API ([`podman`]) and its answer about itself, kept
//! ([`kept_info`]); CRIU's own reports ([`criu`]); and CRIU's lazy pages driven under
//! podman for post-copy and the streamed stop-copy ([`lazy_pages`]).

pub mod criu;
pub mod kept_info;
pub mod lazy_pages;
pub mod podman;
