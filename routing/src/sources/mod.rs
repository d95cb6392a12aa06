//! Where routes come from: a file people write ([`RoutesFileSource`]), or a `Discovery`
//! catalog whose instances carry route tags ([`follow_discovery`]). Every source
//! changes only the routes it installed, through one diff-and-apply (`sync.rs`), and
//! reports whether it is current ([`SourceStatus`]).

mod discovery;
mod routes_file;
mod status;
mod sync;

pub use discovery::{
    follow_discovery, follow_discovery_tcp, follow_discovery_with, routes_from_instances, tcp_routes_from_instances, BALANCER_TAG,
    HTTP_HOST_TAG, HTTP_PATH_TAG, PROTOCOL_TAG, SNI_TAG, TCP_PORT_TAG, WEIGHT_TAG,
};
pub use routes_file::{Reloaded, RoutesFile, RoutesFileSource, TcpRoute};
pub use status::SourceStatus;
