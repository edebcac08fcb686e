//! TLS for NBD (`NBD_OPT_STARTTLS`): the server's certificate settings and
//! the connection stream that starts plain and may be upgraded in place.
//!
//! NBD does TLS the STARTTLS way: the greeting and the first options are
//! plain, the client sends NBD_OPT_STARTTLS, the server acknowledges it, and
//! the TLS handshake then runs on the same socket; option haggling carries
//! on inside TLS. [`Conn`] is that socket, before or after the upgrade.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How the server treats TLS, and the certificate it presents.
///
/// Compared by identity of the rustls configuration: two settings are equal
/// only if they share it (rustls configurations cannot be compared).
#[derive(Clone)]
pub struct TlsSettings {
    acceptor: TlsAcceptor,
    config: Arc<rustls::ServerConfig>,
    required: bool,
}

/// Why TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsSettings {
    /// Uses a ready rustls configuration. With `required`, a client is
    /// served nothing (not even the export list) until it has started TLS;
    /// without, plain and TLS clients are both served.
    pub fn new(config: Arc<rustls::ServerConfig>, required: bool) -> Self {
        Self {
            acceptor: TlsAcceptor::from(Arc::clone(&config)),
            config,
            required,
        }
    }

    /// Builds a configuration presenting the certificate chain in
    /// `certificate` (PEM, leaf first) with the private key in `key` (PEM).
    /// Client certificates are not asked for: NBD clients authenticate the
    /// server, and who may reach the port is a network matter.
    pub fn from_pem_files(
        certificate: &Path,
        key: &Path,
        required: bool,
    ) -> Result<Self, TlsConfigError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let chain_pem = read(certificate)?;
        let chain = CertificateDer::pem_slice_iter(&chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .filter(|chain| !chain.is_empty())
            .ok_or_else(|| TlsConfigError::NoCertificate {
                path: certificate.to_path_buf(),
            })?;
        let key_der =
            PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|_| TlsConfigError::NoKey {
                path: key.to_path_buf(),
            })?;
        Self::from_der(chain, key_der, required)
    }

    /// Builds a configuration from a DER chain (leaf first) and key.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        required: bool,
    ) -> Result<Self, TlsConfigError> {
        // The provider is named rather than taken from the process default,
        // so that nothing depends on which other crate installed one first.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        Ok(Self::new(Arc::new(config), required))
    }

    /// Whether plain clients are refused everything but STARTTLS and ABORT.
    pub fn required(&self) -> bool {
        self.required
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        self.required == other.required && Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for TlsSettings {}

/// A client connection: plain until STARTTLS, then TLS over the same
/// socket.
pub(crate) enum Conn<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
    /// The socket was handed to a TLS handshake that failed; nothing more
    /// can be read or written.
    Lost,
}

impl<S> Conn<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection lost in a failed TLS handshake",
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Lost => Poll::Ready(Err(lost())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Lost => Poll::Ready(Err(lost())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
            Conn::Lost => false,
        }
    }
}
