//! Fixed-newstyle negotiation: greeting, client flags, then option haggling
//! until the client picks an export (NBD_OPT_GO / NBD_OPT_EXPORT_NAME) or
//! gives up (NBD_OPT_ABORT).
//!
//! Every field read from the socket is length-checked before use. Two kinds
//! of client mistakes are distinguished:
//! - ones that leave the byte stream in an unknown state (bad magic, an
//!   option too long to buffer, a closed socket) or that the spec or our
//!   policy says end the session (unknown client flags, over-long export
//!   name, a failed NBD_OPT_EXPORT_NAME): these become a [`HandshakeError`]
//!   and the caller drops the connection;
//! - a malformed payload inside a correctly framed option: the stream is
//!   still in sync, so we answer NBD_REP_ERR_INVALID as the spec asks and
//!   keep negotiating.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::backend::{Backend, Export, OpenError};
use crate::protocol::*;
use crate::server::ServerConfig;
use crate::tls::{Conn, TlsSettings};
use crate::transmission::transmission_flags;

/// Preferred block size advertised in NBD_INFO_BLOCK_SIZE: a page, so
/// clients avoid read-modify-write cycles in the cache below us.
pub(crate) const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// How a successful negotiation ended.
#[derive(Debug)]
pub(crate) enum Negotiated<E> {
    /// The client chose an export; the transmission phase starts now.
    Export { export: Arc<E>, name: String },
    /// The client sent NBD_OPT_ABORT; we acknowledged it and should close.
    Aborted,
}

/// Why a negotiation was cut short; the connection is closed after any of
/// these, and the message is what the warning log says.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("client closed the connection in the middle of a handshake field")]
    Truncated,
    #[error("i/o error during handshake: {0}")]
    Io(io::Error),
    #[error("client flags {0:#x} lack NBD_FLAG_C_FIXED_NEWSTYLE; only fixed newstyle is served")]
    NotFixedNewstyle(u32),
    #[error("client flags {0:#x} include bits this server never advertised")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} has a {length}-byte payload, over the {max}-byte limit")]
    OptionTooLong { option: u32, length: u32, max: u32 },
    #[error("export name of {0} bytes is over the {MAX_STRING_BYTES}-byte limit")]
    NameTooLong(usize),
    #[error("NBD_OPT_EXPORT_NAME name is not valid UTF-8")]
    NameNotUtf8,
    /// NBD_OPT_EXPORT_NAME has no way to report an error except hanging up.
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    ExportNameRefused(OpenError),
    /// NBD_OPT_EXPORT_NAME cannot be answered with NBD_REP_ERR_TLS_REQD,
    /// so the spec says to hang up instead.
    #[error("NBD_OPT_EXPORT_NAME before TLS while TLS is required")]
    ExportNameWithoutTls,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            Self::Truncated
        } else {
            Self::Io(error)
        }
    }
}

/// One negotiation over one stream. Generic over the stream so that it can
/// be driven by an in-memory pipe as well as a socket. The stream may be
/// upgraded to TLS in the middle (NBD_OPT_STARTTLS), hence the [`Conn`].
pub(crate) struct Handshake<'a, S, B> {
    stream: &'a mut Conn<S>,
    backend: &'a B,
    max_option_bytes: u32,
    max_request_bytes: u32,
    tls: Option<&'a TlsSettings>,
}

impl<'a, S, B> Handshake<'a, S, B>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Backend,
{
    pub fn new(stream: &'a mut Conn<S>, backend: &'a B, config: &'a ServerConfig) -> Self {
        Self {
            stream,
            backend,
            max_option_bytes: config.max_option_bytes,
            max_request_bytes: config.max_request_bytes,
            tls: config.tls.as_ref(),
        }
    }

    /// Whether this option must be refused because TLS is required and not
    /// yet started. Only STARTTLS and ABORT are allowed through: the spec
    /// lets a server answer everything else, the export list included,
    /// with NBD_REP_ERR_TLS_REQD, and nothing about the exports should leak
    /// to a client that has not authenticated the server.
    fn needs_tls_first(&self, option: u32) -> bool {
        let required = self.tls.is_some_and(TlsSettings::required);
        required && !self.stream.is_tls() && option != NBD_OPT_STARTTLS && option != NBD_OPT_ABORT
    }

    pub async fn run(mut self) -> Result<Negotiated<B::Export>, HandshakeError> {
        let mut greeting = BytesMut::with_capacity(18);
        greeting.put_u64(NBD_MAGIC);
        greeting.put_u64(NBD_OPTS_MAGIC);
        greeting.put_u16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        self.send(&greeting).await?;

        let client_flags = self.stream.read_u32().await?;
        if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
            return Err(HandshakeError::UnknownClientFlags(client_flags));
        }
        // Plain (non-fixed) newstyle clients cannot cope with option
        // errors, so we would have to guess; refusing them is simpler and
        // every client in use today speaks fixed newstyle.
        if client_flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(HandshakeError::NotFixedNewstyle(client_flags));
        }
        let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;

        loop {
            let (option, data) = self.read_option().await?;
            debug!(option = option_name(option), length = data.len(), "option");
            if self.needs_tls_first(option) {
                if option == NBD_OPT_EXPORT_NAME {
                    return Err(HandshakeError::ExportNameWithoutTls);
                }
                self.send_error(
                    option,
                    NBD_REP_ERR_TLS_REQD,
                    "TLS is required: send NBD_OPT_STARTTLS first",
                )
                .await?;
                continue;
            }
            match option {
                NBD_OPT_EXPORT_NAME => return self.export_name(&data, no_zeroes).await,
                NBD_OPT_ABORT => {
                    // The spec lets a client hang up right after sending
                    // ABORT, so failing to deliver the ACK is not an error.
                    let mut out = BytesMut::new();
                    put_reply(&mut out, option, NBD_REP_ACK, &[]);
                    let _ = self.send(&out).await;
                    return Ok(Negotiated::Aborted);
                }
                NBD_OPT_LIST => self.list(&data).await?,
                NBD_OPT_STARTTLS => self.start_tls(&data).await?,
                NBD_OPT_INFO | NBD_OPT_GO => {
                    if let Some(done) = self.info_or_go(option, &data).await? {
                        return Ok(done);
                    }
                }
                // Everything else, including STRUCTURED_REPLY (clients then fall back to simple
                // replies), meta contexts and extended headers.
                _ => {
                    self.send_error(
                        option,
                        NBD_REP_ERR_UNSUP,
                        "option not supported by this server",
                    )
                    .await?
                }
            }
        }
    }

    /// Answers NBD_OPT_STARTTLS and, when accepted, runs the TLS handshake
    /// on the same socket; haggling then continues inside TLS.
    async fn start_tls(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        let Some(tls) = self.tls else {
            return self
                .send_error(
                    NBD_OPT_STARTTLS,
                    NBD_REP_ERR_UNSUP,
                    "TLS is not enabled on this server",
                )
                .await;
        };
        // The spec: STARTTLS once TLS is up is an error, and the server
        // must not start a second handshake inside the first.
        if self.stream.is_tls() {
            return self
                .send_error(
                    NBD_OPT_STARTTLS,
                    NBD_REP_ERR_INVALID,
                    "TLS is already active on this connection",
                )
                .await;
        }
        if !data.is_empty() {
            return self
                .send_error(
                    NBD_OPT_STARTTLS,
                    NBD_REP_ERR_INVALID,
                    "NBD_OPT_STARTTLS takes no data",
                )
                .await;
        }
        let mut out = BytesMut::new();
        put_reply(&mut out, NBD_OPT_STARTTLS, NBD_REP_ACK, &[]);
        self.send(&out).await?;
        // The plain stream moves into the TLS stream; if the handshake
        // fails it is gone and the connection can only be closed.
        match std::mem::replace(self.stream, Conn::Lost) {
            Conn::Plain(plain) => {
                let upgraded = tls
                    .acceptor()
                    .accept(plain)
                    .await
                    .map_err(HandshakeError::Tls)?;
                *self.stream = Conn::Tls(Box::new(upgraded));
                debug!("TLS started");
                Ok(())
            }
            other => {
                // Only `Lost` gets here (TLS was checked above), and a lost
                // stream fails its next read anyway; put it back unchanged.
                *self.stream = other;
                Err(HandshakeError::Tls(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "connection already lost",
                )))
            }
        }
    }

    /// Reads one option header and its payload, refusing payloads larger
    /// than the configured bound before allocating for them.
    async fn read_option(&mut self) -> Result<(u32, Vec<u8>), HandshakeError> {
        let mut header = [0u8; OPTION_HEADER_LEN];
        self.stream.read_exact(&mut header).await?;
        let mut h = &header[..];
        let (magic, option, length) = (h.get_u64(), h.get_u32(), h.get_u32());
        if magic != NBD_OPTS_MAGIC {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        if length > self.max_option_bytes {
            return Err(HandshakeError::OptionTooLong {
                option,
                length,
                max: self.max_option_bytes,
            });
        }
        let mut data = vec![0u8; length as usize];
        self.stream.read_exact(&mut data).await?;
        Ok((option, data))
    }

    async fn export_name(
        &mut self,
        data: &[u8],
        no_zeroes: bool,
    ) -> Result<Negotiated<B::Export>, HandshakeError> {
        if data.len() > MAX_STRING_BYTES {
            return Err(HandshakeError::NameTooLong(data.len()));
        }
        let name = std::str::from_utf8(data)
            .map_err(|_| HandshakeError::NameNotUtf8)?
            .to_owned();
        let export = self
            .backend
            .open(&name)
            .map_err(HandshakeError::ExportNameRefused)?;
        let mut out = BytesMut::with_capacity(10 + EXPORT_NAME_REPLY_ZEROES);
        out.put_u64(export.size());
        out.put_u16(transmission_flags(export.read_only()));
        if !no_zeroes {
            out.put_bytes(0, EXPORT_NAME_REPLY_ZEROES);
        }
        self.send(&out).await?;
        Ok(Negotiated::Export { export, name })
    }

    async fn list(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        if !data.is_empty() {
            warn!(length = data.len(), "NBD_OPT_LIST with a payload");
            return self
                .send_error(
                    NBD_OPT_LIST,
                    NBD_REP_ERR_INVALID,
                    "NBD_OPT_LIST takes no data",
                )
                .await;
        }
        let mut out = BytesMut::new();
        for listing in self.backend.list() {
            // A name the client could not send back to us is useless to it.
            if listing.name.len() > MAX_STRING_BYTES {
                warn!(
                    length = listing.name.len(),
                    "not listing an export whose name is over the protocol limit"
                );
                continue;
            }
            let description = truncate_utf8(&listing.description, MAX_STRING_BYTES);
            let mut entry = BytesMut::with_capacity(4 + listing.name.len() + description.len());
            entry.put_u32(len_u32(listing.name.len()));
            entry.put_slice(listing.name.as_bytes());
            entry.put_slice(description.as_bytes());
            put_reply(&mut out, NBD_OPT_LIST, NBD_REP_SERVER, &entry);
        }
        put_reply(&mut out, NBD_OPT_LIST, NBD_REP_ACK, &[]);
        self.send(&out).await
    }

    /// Answers NBD_OPT_INFO or NBD_OPT_GO. Returns the negotiated export
    /// only for a successful GO; INFO (and any failure) keeps haggling.
    async fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Negotiated<B::Export>>, HandshakeError> {
        let request = match InfoRequest::parse(data) {
            Ok(request) => request,
            Err(InfoRequestError::NameTooLong(length)) => {
                return Err(HandshakeError::NameTooLong(length));
            }
            Err(InfoRequestError::Malformed(why)) => {
                warn!(
                    option = option_name(option),
                    why, "malformed option payload"
                );
                self.send_error(option, NBD_REP_ERR_INVALID, why).await?;
                return Ok(None);
            }
        };
        let export = match self.backend.open(&request.name) {
            Ok(export) => export,
            Err(error) => {
                // The spec's ERR_UNKNOWN means "the requested export is not
                // available", which covers both OpenError variants.
                debug!(name = %request.name, %error, "export refused");
                self.send_error(option, NBD_REP_ERR_UNKNOWN, &error.to_string())
                    .await?;
                return Ok(None);
            }
        };

        let mut out = BytesMut::new();
        // NBD_INFO_EXPORT is mandatory whatever the client asked for, and we
        // always send block sizes because our maximum is smaller than what
        // clients assume by default.
        let mut info = BytesMut::with_capacity(14);
        info.put_u16(NBD_INFO_EXPORT);
        info.put_u64(export.size());
        info.put_u16(transmission_flags(export.read_only()));
        put_reply(&mut out, option, NBD_REP_INFO, &info);

        info.clear();
        info.put_u16(NBD_INFO_BLOCK_SIZE);
        info.put_u32(1);
        info.put_u32(PREFERRED_BLOCK_SIZE.min(self.max_request_bytes));
        info.put_u32(self.max_request_bytes);
        put_reply(&mut out, option, NBD_REP_INFO, &info);

        let mut sent_name = false;
        let mut sent_description = false;
        for requested in request.infos {
            match requested {
                NBD_INFO_NAME if !sent_name => {
                    sent_name = true;
                    info.clear();
                    info.put_u16(NBD_INFO_NAME);
                    info.put_slice(request.name.as_bytes());
                    put_reply(&mut out, option, NBD_REP_INFO, &info);
                }
                NBD_INFO_DESCRIPTION if !sent_description => {
                    sent_description = true;
                    let listing = self
                        .backend
                        .list()
                        .into_iter()
                        .find(|l| l.name == request.name);
                    if let Some(listing) = listing.filter(|l| !l.description.is_empty()) {
                        info.clear();
                        info.put_u16(NBD_INFO_DESCRIPTION);
                        info.put_slice(
                            truncate_utf8(&listing.description, MAX_STRING_BYTES).as_bytes(),
                        );
                        put_reply(&mut out, option, NBD_REP_INFO, &info);
                    }
                }
                // Already sent unconditionally, requested twice, or unknown
                // to us: the spec says to ignore what we do not support.
                _ => {}
            }
        }
        put_reply(&mut out, option, NBD_REP_ACK, &[]);
        self.send(&out).await?;

        Ok((option == NBD_OPT_GO).then_some(Negotiated::Export {
            export,
            name: request.name,
        }))
    }

    async fn send_error(
        &mut self,
        option: u32,
        reply_type: u32,
        message: &str,
    ) -> Result<(), HandshakeError> {
        let mut out = BytesMut::new();
        put_reply(
            &mut out,
            option,
            reply_type,
            truncate_utf8(message, MAX_STRING_BYTES).as_bytes(),
        );
        self.send(&out).await
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), HandshakeError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

/// Appends one option reply to `out`.
fn put_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    out.reserve(20 + data.len());
    out.put_u64(NBD_REP_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(len_u32(data.len()));
    out.put_slice(data);
}

/// Every reply payload is built from strings capped at
/// [`MAX_STRING_BYTES`], so this never saturates in practice.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Decoded payload of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, PartialEq, Eq)]
struct InfoRequest {
    name: String,
    infos: Vec<u16>,
}

#[derive(Debug, PartialEq, Eq)]
enum InfoRequestError {
    /// Our policy (and the spec's string limit) says close the connection.
    NameTooLong(usize),
    /// Framing is intact, only the contents are wrong: answer ERR_INVALID.
    Malformed(&'static str),
}

impl InfoRequest {
    /// Layout: u32 name length, name, u16 count, count × u16 info type.
    fn parse(mut data: &[u8]) -> Result<Self, InfoRequestError> {
        use InfoRequestError::*;
        if data.remaining() < 4 {
            return Err(Malformed("option too short for the export name length"));
        }
        let name_len = data.get_u32() as usize;
        if name_len > MAX_STRING_BYTES {
            return Err(NameTooLong(name_len));
        }
        if data.remaining() < name_len {
            return Err(Malformed("export name runs past the end of the option"));
        }
        let name = std::str::from_utf8(&data[..name_len])
            .map_err(|_| Malformed("export name is not valid UTF-8"))?
            .to_owned();
        data.advance(name_len);
        if data.remaining() < 2 {
            return Err(Malformed(
                "option too short for the information request count",
            ));
        }
        let count = usize::from(data.get_u16());
        if data.remaining() != count * 2 {
            return Err(Malformed(
                "information request count does not match the option length",
            ));
        }
        let infos = (0..count).map(|_| data.get_u16()).collect();
        Ok(Self { name, infos })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(name.len() as u32);
        b.put_slice(name);
        b.put_u16(infos.len() as u16);
        for i in infos {
            b.put_u16(*i);
        }
        b.to_vec()
    }

    #[test]
    fn parses_info_request() {
        let parsed = InfoRequest::parse(&payload(b"disk0", &[NBD_INFO_BLOCK_SIZE, 77]));
        assert_eq!(
            parsed,
            Ok(InfoRequest {
                name: "disk0".into(),
                infos: vec![NBD_INFO_BLOCK_SIZE, 77],
            })
        );
        assert_eq!(
            InfoRequest::parse(&payload(b"", &[])).map(|r| r.name),
            Ok(String::new())
        );
    }

    #[test]
    fn rejects_malformed_info_requests() {
        let good = payload(b"disk0", &[1, 2]);
        // Every strict prefix is malformed, never a panic.
        for cut in 0..good.len() {
            assert!(
                matches!(
                    InfoRequest::parse(&good[..cut]),
                    Err(InfoRequestError::Malformed(_))
                ),
                "prefix of {cut} bytes"
            );
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(InfoRequest::parse(&trailing).is_err());
        assert!(InfoRequest::parse(&payload(&[0xff, 0xfe], &[])).is_err());
    }

    #[test]
    fn over_long_names_are_flagged_separately() {
        let name = vec![b'a'; MAX_STRING_BYTES + 1];
        assert_eq!(
            InfoRequest::parse(&payload(&name, &[])),
            Err(InfoRequestError::NameTooLong(MAX_STRING_BYTES + 1))
        );
        // The length field alone decides, even if the bytes are missing.
        assert_eq!(
            InfoRequest::parse(&u32::MAX.to_be_bytes()),
            Err(InfoRequestError::NameTooLong(u32::MAX as usize))
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("héllo", 3), "hé");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
