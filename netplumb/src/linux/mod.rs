//! The kernel drivers (feature `netlink`): everything is done over netlink sockets opened
//! inside the right namespace, never by running `ip` or `nft`.

mod bridge;
mod firewall;
mod links;
mod netns;
mod nft;
mod state;

pub use bridge::{BridgeNetwork, KernelConfig, DEFAULT_STATE_DIR};
