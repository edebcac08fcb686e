//! Links between stretch nodes: the cluster CA (`stretch init`) and QUIC
//! endpoints that speak mutual TLS against it.
//!
//! This is the transport foundation of the multi-site data plane; delta
//! shipping, remote reads and the link shaper build on [`PeerEndpoint`].

mod endpoint;
mod framing;
mod pki;
mod shaped_socket;

pub use endpoint::{
    ALPN, BIDI_STREAMS_MAX, CongestionControl, EndpointError, PeerEndpoint, UNI_STREAMS_MAX,
    peer_certificate,
};
pub use framing::{
    CONNECTION_FRAME_BUDGET_BYTES, FRAME_STALL_TIMEOUT, FrameBudget, FrameError, HELLO_BYTES_MAX,
    read_message, read_message_within, write_frame, write_message,
};
pub use pki::{
    CA_DAYS_DEFAULT, CertificateInfo, IdentityError, InitReport, Lifetimes, NODE_DAYS_DEFAULT,
    NodeIdentity, PkiError, Renewed, export, init, init_with, renew,
};
pub use shaped_socket::{LINK_QUEUE_BYTES_MAX, LinkTable, ShapedSocket, TIMER_SLACK};
