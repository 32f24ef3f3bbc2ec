//! One module per kernel subsystem the agents drive: addresses, routes and rules
//! ([`routing`]), nftables ([`nft`]), conntrack ([`conntrack`]) and their shared netlink
//! exchange ([`nfnetlink`]), packets held during the freeze ([`hold`]), WireGuard
//! ([`wireguard`]) and the tunnel plumbing built from them ([`overlay`]), the cgroup
//! freezer ([`freezer`]), processes ([`process`]) and ending sockets ([`sock_diag`]).

pub mod conntrack;
pub mod freezer;
pub mod hold;
pub mod nfnetlink;
pub mod nft;
pub mod overlay;
pub mod process;
pub mod routing;
pub mod sock_diag;
pub mod wireguard;
