//! A node's QUIC endpoint: it accepts connections from peers and opens them
//! to peers, both ways with mutual TLS against the cluster CA. A peer whose
//! certificate does not chain to the CA is refused during the handshake,
//! whichever side it is on.
//!
//! Chaining to the CA makes a peer a cluster member, not a particular node.
//! When dialling, TLS checks the server certificate names the node dialled
//! (and [`PeerEndpoint::connect`] checks it names that node only); when
//! accepting, [`peer_certificate`] tells which node the client certificate
//! names, for the caller to hold the peer to.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::pki::{CertificateInfo, IdentityError, NodeIdentity};
use crate::shaped_socket::{LinkTable, ShapedSocket};

/// Application protocol name negotiated over TLS.
pub const ALPN: &[u8] = b"stretch/1";

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto configuration: {0}")]
    Crypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("cannot bind {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not a valid peer name")]
    BadPeerName(String),
    #[error("cannot connect to {peer} at {address}: {source}")]
    Connect {
        peer: String,
        address: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connection to {peer} at {address} failed: {source}")]
    Connection {
        peer: String,
        address: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("{address} is not node {peer}: {source}")]
    WrongPeer {
        peer: String,
        address: SocketAddr,
        #[source]
        source: IdentityError,
    },
    #[error("{address} is node {named}, not {peer}")]
    OtherPeer {
        peer: String,
        address: SocketAddr,
        named: String,
    },
}

/// A node's endpoint between sites.
/// A silent peer is declared gone after this long: the engine then keeps
/// deltas for it and fails remote requests by their own timeout, and the
/// dialer starts reconnecting.
pub const PEER_IDLE_TIMEOUT_MS: u32 = 3_000;
/// Keep-alives keep an idle but healthy link from reaching that timeout.
const KEEP_ALIVE_MS: u64 = 500;
/// Flow-control windows sized for long fat links: a stream may have 16 MiB
/// and a connection 64 MiB unread at the receiver (memory bound per peer),
/// enough for 1 Gbit/s at 100 ms round trip.
const STREAM_WINDOW_BYTES: u32 = 16 << 20;
/// UDP socket buffers asked of the kernel (capped by net.core.rmem_max and
/// wmem_max).
const SOCKET_BUFFER_BYTES: usize = 8 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Streams a peer may have open at once towards this node: each group's
/// delta stream and one per request or control message in flight. A peer
/// wanting more waits for one to end (QUIC stream credit), which also
/// bounds the tasks and buffers a connection costs.
pub const UNI_STREAMS_MAX: u32 = 100;
/// Bidirectional streams carry only the hello (and echoes in tests).
pub const BIDI_STREAMS_MAX: u32 = 4;

/// How an endpoint's connections pace what they send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionControl {
    /// BBR: sends at the measured bottleneck rate, and one lost packet
    /// does not shrink the window. Between sites, where a connection comes
    /// back after a cut and must carry a backlog at once, this is what
    /// keeps catch-up at the speed of the link: with Cubic, one loss early
    /// in a new connection's slow start leaves a window of a few packets
    /// that grows for seconds (a 192 MiB backlog over a 25 ms link took
    /// 19 s with Cubic, 3 s with BBR; `bench/catch-up.py`).
    #[default]
    Bbr,
    /// Cubic, quinn's default (loss-based, like most TCP stacks).
    Cubic,
}

fn transport_config(congestion: CongestionControl) -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    config
        .max_idle_timeout(Some(quinn::VarInt::from_u32(PEER_IDLE_TIMEOUT_MS).into()))
        .keep_alive_interval(Some(std::time::Duration::from_millis(KEEP_ALIVE_MS)))
        .stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW_BYTES))
        .receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW_BYTES))
        .send_window(CONNECTION_WINDOW_BYTES as u64)
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(UNI_STREAMS_MAX))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(BIDI_STREAMS_MAX));
    match congestion {
        CongestionControl::Bbr => {
            config.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        CongestionControl::Cubic => config
            .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
    };
    config
}

#[derive(Debug)]
pub struct PeerEndpoint {
    endpoint: quinn::Endpoint,
    name: String,
}

impl PeerEndpoint {
    /// Binds a UDP socket at `address` serving and dialling as `identity`.
    pub fn bind(identity: &NodeIdentity, address: SocketAddr) -> Result<Self, EndpointError> {
        Self::bind_with_links(identity, address, None, CongestionControl::default())
    }

    /// Like [`PeerEndpoint::bind`], with every datagram sent through the
    /// link shaper of its destination (emulated long-distance links).
    /// Needs a tokio runtime.
    pub fn bind_shaped(
        identity: &NodeIdentity,
        address: SocketAddr,
        links: LinkTable,
        congestion: CongestionControl,
    ) -> Result<Self, EndpointError> {
        Self::bind_with_links(identity, address, Some(links), congestion)
    }

    fn bind_with_links(
        identity: &NodeIdentity,
        address: SocketAddr,
        links: Option<LinkTable>,
        congestion: CongestionControl,
    ) -> Result<Self, EndpointError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(identity.ca.clone())?;
        let roots = Arc::new(roots);

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(vec![identity.certificate.clone()], identity.key.clone_key())?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        let transport = Arc::new(transport_config(congestion));
        let mut server_config =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
        server_config.transport_config(transport.clone());

        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![identity.certificate.clone()], identity.key.clone_key())?;
        client_tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut client_config =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
        client_config.transport_config(transport);

        let bind_error = |source| EndpointError::Bind { address, source };
        let runtime = quinn::default_runtime().ok_or_else(|| {
            bind_error(std::io::Error::other(
                "no async runtime to drive the endpoint",
            ))
        })?;
        let socket = std::net::UdpSocket::bind(address).map_err(bind_error)?;
        // A burst from a fast peer overflows the kernel's default 208 KiB
        // receive buffer; every datagram dropped there is a loss to QUIC,
        // which then shrinks its window on a long link for many round
        // trips. The kernel caps the size at net.core.rmem_max.
        let buffers = socket2::SockRef::from(&socket);
        for result in [
            buffers.set_recv_buffer_size(SOCKET_BUFFER_BYTES),
            buffers.set_send_buffer_size(SOCKET_BUFFER_BYTES),
        ] {
            if let Err(error) = result {
                tracing::warn!(%error, "cannot enlarge the UDP socket buffers");
            }
        }
        let inner = runtime.wrap_udp_socket(socket).map_err(bind_error)?;
        let socket: Arc<dyn quinn::AsyncUdpSocket> = match links {
            None => inner,
            Some(links) => Arc::new(ShapedSocket::new(inner, links)),
        };
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        endpoint.set_default_client_config(client_config);
        Ok(PeerEndpoint {
            endpoint,
            name: identity.name.clone(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens a connection to the node `peer` at `address`; its certificate
    /// must chain to the cluster CA and name `peer`, and no other node.
    pub async fn connect(
        &self,
        peer: &str,
        address: SocketAddr,
    ) -> Result<quinn::Connection, EndpointError> {
        ServerName::try_from(peer.to_string())
            .map_err(|_| EndpointError::BadPeerName(peer.to_string()))?;
        let connecting =
            self.endpoint
                .connect(address, peer)
                .map_err(|source| EndpointError::Connect {
                    peer: peer.to_string(),
                    address,
                    source,
                })?;
        let connection = connecting
            .await
            .map_err(|source| EndpointError::Connection {
                peer: peer.to_string(),
                address,
                source,
            })?;
        // TLS matched `peer` against the certificate's names; a certificate
        // naming several nodes would match each of them, so it is refused.
        let named = match peer_certificate(&connection) {
            Ok(info) => info.node,
            Err(source) => {
                connection.close(1u32.into(), b"not the node dialled");
                return Err(EndpointError::WrongPeer {
                    peer: peer.to_string(),
                    address,
                    source,
                });
            }
        };
        if named != peer {
            connection.close(1u32.into(), b"not the node dialled");
            return Err(EndpointError::OtherPeer {
                peer: peer.to_string(),
                address,
                named,
            });
        }
        Ok(connection)
    }

    /// Waits for the next peer to connect. A peer that fails the mutual
    /// TLS handshake is logged and skipped; None once the endpoint closed.
    pub async fn accept(&self) -> Option<quinn::Connection> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => return Some(connection),
                Err(error) => {
                    tracing::warn!(%remote, %error, "refused a peer that failed the cluster handshake");
                }
            }
        }
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// The node a connection's peer certificate names (the TLS handshake
/// already checked it chains to the cluster CA).
pub fn peer_certificate(connection: &quinn::Connection) -> Result<CertificateInfo, IdentityError> {
    let identity = connection
        .peer_identity()
        .ok_or(IdentityError::NoCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| IdentityError::NoCertificate)?;
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    CertificateInfo::parse(leaf)
}
