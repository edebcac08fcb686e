//! Links between stretch nodes: the cluster CA (`stretch init`) and QUIC
//! endpoints that speak mutual TLS against it.
//!
//! This is the transport foundation of the multi-site data plane; delta
//! shipping, remote reads and the link shaper build on [`PeerEndpoint`].

mod endpoint;
mod framing;
mod pki;
mod shaped_socket;

pub use endpoint::{ALPN, EndpointError, PeerEndpoint};
pub use framing::{FrameError, read_message, write_message};
pub use pki::{InitReport, NodeIdentity, PkiError, init};
pub use shaped_socket::{LINK_QUEUE_BYTES_MAX, LinkTable, ShapedSocket, TIMER_SLACK};
