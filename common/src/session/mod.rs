//! A session with the other agent: framing ([`wire`]), the token handshake and the sealed
//! channel ([`auth`]), archive streaming ([`transfer`]), the typed requests of the source
//! side ([`remote`]) and the checks of what a peer sends ([`validate`]).

pub mod auth;
pub mod remote;
pub mod transfer;
pub mod validate;
pub mod wire;
