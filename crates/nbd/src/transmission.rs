//! Transmission-phase wire format: request headers in, simple replies out.
//!
//! Pure encoding and decoding with no I/O, so every rule about what a header
//! may contain is checked here and unit tested without a socket.

use bytes::Buf;

use crate::backend::ExportError;
use crate::protocol::*;

/// The fixed 28-byte header that starts every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    /// Opaque cookie the client uses to match our reply to its request.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// The request did not start with `NBD_REQUEST_MAGIC`: the stream is out of
/// sync (or was never NBD) and nothing after this point can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub(crate) struct BadRequestMagic(pub u32);

impl RequestHeader {
    pub fn parse(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, BadRequestMagic> {
        // `buf` is exactly REQUEST_HEADER_LEN bytes and the reads below add
        // up to that, so the `Buf` getters cannot run out of input.
        let mut b = &buf[..];
        let magic = b.get_u32();
        if magic != NBD_REQUEST_MAGIC {
            return Err(BadRequestMagic(magic));
        }
        Ok(Self {
            flags: b.get_u16(),
            command: Command::from_wire(b.get_u16()),
            handle: b.get_u64(),
            offset: b.get_u64(),
            length: b.get_u32(),
        })
    }

    /// Whether `offset..offset+length` lies inside an export of `size`
    /// bytes. Overflowing `u64` counts as outside.
    pub fn in_bounds(&self, size: u64) -> bool {
        self.offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= size)
    }

    /// Whether every flag bit set is one this server accepts for the
    /// command. Flags tied to features we never negotiate (DF, REQ_ONE,
    /// FAST_ZERO, PAYLOAD_LEN) are refused rather than silently ignored,
    /// because ignoring them would quietly change their meaning (e.g.
    /// FAST_ZERO promises to fail instead of being slow).
    pub fn flags_valid(&self) -> bool {
        self.flags & !self.command.allowed_flags() == 0
    }

    pub fn fua(&self) -> bool {
        self.flags & NBD_CMD_FLAG_FUA != 0
    }
}

/// The request types this server knows; anything else is kept verbatim so it
/// can be logged and answered with EINVAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// Includes CACHE, BLOCK_STATUS and RESIZE, which we never advertise.
    Unknown(u16),
}

impl Command {
    pub fn from_wire(kind: u16) -> Self {
        match kind {
            NBD_CMD_READ => Self::Read,
            NBD_CMD_WRITE => Self::Write,
            NBD_CMD_DISC => Self::Disc,
            NBD_CMD_FLUSH => Self::Flush,
            NBD_CMD_TRIM => Self::Trim,
            NBD_CMD_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unknown(other),
        }
    }

    /// Name for logs and spans.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Disc => "disc",
            Self::Flush => "flush",
            Self::Trim => "trim",
            Self::WriteZeroes => "write_zeroes",
            Self::Unknown(_) => "unknown",
        }
    }

    /// FUA is valid on every command once SEND_FUA is advertised (the spec
    /// says so; it is meaningless on reads but harmless). NO_HOLE only
    /// qualifies WRITE_ZEROES. DISC's flags are irrelevant as the
    /// connection is going away.
    fn allowed_flags(&self) -> u16 {
        match self {
            Self::Read | Self::Write | Self::Flush | Self::Trim => NBD_CMD_FLAG_FUA,
            Self::WriteZeroes => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
            Self::Disc => u16::MAX,
            Self::Unknown(_) => 0,
        }
    }
}

/// Encodes the 16-byte header of a simple reply. A successful READ's data
/// follows it directly; every other reply is just the header.
pub(crate) fn simple_reply_header(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_LEN];
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// The NBD error number sent for an export failure.
pub(crate) fn error_code(error: &ExportError) -> u32 {
    match error {
        ExportError::Io(_) => NBD_EIO,
        ExportError::ReadOnly => NBD_EPERM,
        ExportError::NoSpace(_) => NBD_ENOSPC,
        ExportError::Invalid(_) => NBD_EINVAL,
        ExportError::ShuttingDown => NBD_ESHUTDOWN,
    }
}

/// Transmission flags advertised for an export.
pub(crate) fn transmission_flags(read_only: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= NBD_FLAG_READ_ONLY;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u16, kind: u16, handle: u64, offset: u64, length: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&handle.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&length.to_be_bytes());
        b
    }

    #[test]
    fn parses_every_field() {
        let h = RequestHeader::parse(&header(1, 1, 0xdead_beef_0102_0304, 4096, 512));
        assert_eq!(
            h,
            Ok(RequestHeader {
                flags: 1,
                command: Command::Write,
                handle: 0xdead_beef_0102_0304,
                offset: 4096,
                length: 512,
            })
        );
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = header(0, 0, 1, 0, 0);
        b[0] ^= 0xff;
        assert!(RequestHeader::parse(&b).is_err());
    }

    #[test]
    fn unknown_commands_are_kept() {
        let h = RequestHeader::parse(&header(0, 99, 1, 0, 0));
        assert_eq!(h.map(|h| h.command), Ok(Command::Unknown(99)));
        let h = RequestHeader::parse(&header(0, NBD_CMD_CACHE, 1, 0, 0));
        assert_eq!(h.map(|h| h.command), Ok(Command::Unknown(NBD_CMD_CACHE)));
    }

    #[test]
    fn bounds_checks_handle_overflow() {
        let h = |offset, length| RequestHeader {
            flags: 0,
            command: Command::Read,
            handle: 0,
            offset,
            length,
        };
        assert!(h(0, 100).in_bounds(100));
        assert!(h(100, 0).in_bounds(100));
        assert!(!h(1, 100).in_bounds(100));
        assert!(!h(101, 0).in_bounds(100));
        assert!(!h(u64::MAX, 1).in_bounds(u64::MAX));
    }

    #[test]
    fn flag_validation_per_command() {
        let h = |command, flags| RequestHeader {
            flags,
            command,
            handle: 0,
            offset: 0,
            length: 0,
        };
        assert!(h(Command::Write, NBD_CMD_FLAG_FUA).flags_valid());
        assert!(!h(Command::Write, NBD_CMD_FLAG_NO_HOLE).flags_valid());
        assert!(
            h(
                Command::WriteZeroes,
                NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA
            )
            .flags_valid()
        );
        assert!(!h(Command::WriteZeroes, NBD_CMD_FLAG_FAST_ZERO).flags_valid());
        assert!(!h(Command::Read, NBD_CMD_FLAG_DF).flags_valid());
        assert!(h(Command::Disc, 0xffff).flags_valid());
    }

    #[test]
    fn reply_header_layout() {
        let r = simple_reply_header(0x0102_0304_0506_0708, NBD_EINVAL);
        assert_eq!(&r[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&r[4..8], &[0, 0, 0, 22]);
        assert_eq!(&r[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn transmission_flags_mark_read_only() {
        assert_eq!(transmission_flags(false) & NBD_FLAG_READ_ONLY, 0);
        assert_ne!(transmission_flags(true) & NBD_FLAG_READ_ONLY, 0);
        assert_ne!(transmission_flags(false) & NBD_FLAG_CAN_MULTI_CONN, 0);
    }
}
