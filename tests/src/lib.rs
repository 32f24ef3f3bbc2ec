//! The multi-host lab.
