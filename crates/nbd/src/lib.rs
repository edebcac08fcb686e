//! NBD server front end for stretch volumes.
//!
//! Speaks the fixed-newstyle handshake (NBD_OPT_GO / INFO / LIST /
//! EXPORT_NAME / ABORT, and STARTTLS when [`ServerConfig::tls`] is set)
//! and simple replies in the transmission phase, with many requests in flight per connection and replies sent as they
//! complete. Storage is pluggable through [`Backend`] (name → export) and
//! [`Export`] (bytes); the server does all protocol validation, so an export
//! only ever sees in-range, non-empty requests no larger than
//! [`ServerConfig::max_request_bytes`].
//!
//! ```no_run
//! # async fn run<B: stretch_nbd::Backend>(backend: std::sync::Arc<B>) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! stretch_nbd::serve(listener, backend, stretch_nbd::ServerConfig::default(), shutdown).await
//! # }
//! ```

pub mod backend;
pub mod protocol;

mod handshake;
mod server;
mod session;
mod tls;
mod transmission;

pub use backend::{Backend, Export, ExportError, ExportListing, OpenError};
pub use server::{
    CONNECTION_RESERVE_BYTES, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT_BYTES,
    DEFAULT_MAX_IN_FLIGHT_PER_CONNECTION, DEFAULT_MAX_OPTION_BYTES, DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_SHUTDOWN_GRACE, ServerConfig, serve, serve_stream,
};
pub use tls::{TlsConfigError, TlsSettings};
