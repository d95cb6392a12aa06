//! The kernel drivers (feature `netlink`): everything is done over netlink sockets opened
//! inside the right namespace, never by running `ip` or `nft`.

mod bridge;
mod firewall;
mod links;
mod macvlan;
mod named_netns;
mod netns;
mod nft;
#[cfg(feature = "overlay")]
mod overlay;
mod state;

pub use bridge::{BridgeNetwork, KernelConfig, DEFAULT_STATE_DIR};
pub use macvlan::MacvlanNetwork;
pub use named_netns::{create_netns, delete_netns, run_in_netns};
#[cfg(feature = "overlay")]
pub use overlay::{OverlayConfig, OverlayNetwork, VXLAN_OVERHEAD};
