//! What the NBD server needs from whatever stores the data.
//!
//! The server owns the wire protocol (handshake, option haggling, request
//! framing, bounds checks, replies); a [`Backend`] only resolves export names
//! and an [`Export`] only moves bytes. Bounds are checked by the server before
//! any call reaches an export, so an export may assume
//! `offset + length <= size()`, `0 < length` and
//! `length <= ServerConfig::max_request_bytes` (default
//! [`DEFAULT_MAX_REQUEST_BYTES`](crate::DEFAULT_MAX_REQUEST_BYTES)); larger
//! TRIM and WRITE_ZEROES requests arrive split into consecutive calls.
//! Offsets and lengths are not aligned to anything: the export handles any
//! read-modify-write it needs.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

/// One entry of OPT_LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportListing {
    pub name: String,
    pub description: String,
}

/// Why an export could not be opened; maps to NBD_REP_ERR_* replies.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OpenError {
    #[error("no export named {0:?}")]
    Unknown(String),
    #[error("export {0:?} is not available now: {1}")]
    Unavailable(String, String),
}

/// Why one request failed; maps to an NBD error code in the reply.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ExportError {
    /// EIO: the data could not be read or made durable.
    #[error("i/o error: {0}")]
    Io(String),
    /// EPERM: write to a read-only export.
    #[error("export is read-only")]
    ReadOnly,
    /// ENOSPC: no room to take the write.
    #[error("no space: {0}")]
    NoSpace(String),
    /// EINVAL: the request is malformed for this export.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// ESHUTDOWN: the server is shutting down; the client should retry elsewhere.
    #[error("shutting down")]
    ShuttingDown,
}

/// Resolves export names for the handshake phase.
pub trait Backend: Send + Sync + 'static {
    type Export: Export;

    /// Every export this server offers, for OPT_LIST.
    fn list(&self) -> Vec<ExportListing>;

    /// Opens `name` for one client connection (OPT_GO / OPT_EXPORT_NAME).
    /// An empty name is the default export; a backend without one returns
    /// [`OpenError::Unknown`].
    fn open(&self, name: &str) -> Result<Arc<Self::Export>, OpenError>;
}

/// One opened export. Calls may run concurrently, many per connection.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes; fixed for the life of the connection.
    fn size(&self) -> u64;

    /// Read-only exports refuse WRITE, TRIM and WRITE_ZEROES with EPERM.
    fn read_only(&self) -> bool;

    fn read(
        &self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<Bytes, ExportError>> + Send;

    /// With `fua`, returns only once the data is durable.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;

    /// Returns once every write completed before it is durable.
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send;

    /// A hint that the range is no longer needed; reading it afterwards may
    /// return old data or zeros.
    fn trim(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;

    /// Makes the range read as zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;
}
