//! Frames: a little-endian u32 length, then one archived [`PeerMessage`].

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::message::PeerMessage;

/// Largest frame accepted: a delta of 32 MiB of blocks plus its keys.
pub const FRAME_BYTES_MAX: u32 = 40 << 20;

/// Bytes of the length prefix before each archive.
const LENGTH_BYTES: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes is over the {FRAME_BYTES_MAX}-byte limit")]
    FrameTooLarge(u64),
    #[error("frame cut short: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error("malformed archive: {0}")]
    Malformed(String),
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// An archive aligned as [`decode_archive`] reads it in place.
pub type ArchiveBuffer = AlignedVec<16>;

/// A frame as its two parts: the length prefix and the archive. Written
/// one after the other, they are the frame, without copying the archive
/// behind a prefix first.
#[derive(Debug)]
pub struct FrameParts {
    pub header: [u8; LENGTH_BYTES],
    pub archive: ArchiveBuffer,
}

impl FrameParts {
    /// Bytes on the wire.
    pub fn wire_bytes(&self) -> usize {
        LENGTH_BYTES + self.archive.len()
    }
}

/// Encodes a message as one frame, refusing what a peer would refuse: a
/// message breaking the protocol's rules, or a frame over
/// [`FRAME_BYTES_MAX`].
pub fn encode_frame(message: &PeerMessage) -> Result<Vec<u8>, WireError> {
    let parts = encode_frame_parts(message)?;
    let mut frame = Vec::with_capacity(parts.wire_bytes());
    frame.extend_from_slice(&parts.header);
    frame.extend_from_slice(&parts.archive);
    Ok(frame)
}

/// [`encode_frame`], as its prefix and archive.
pub fn encode_frame_parts(message: &PeerMessage) -> Result<FrameParts, WireError> {
    message.check()?;
    let archive = rkyv::to_bytes::<rancor::Error>(message)
        .map_err(|error| WireError::Invalid(format!("cannot archive: {error}")))?;
    let length = match u32::try_from(archive.len()) {
        Ok(length) if length <= FRAME_BYTES_MAX => length,
        _ => return Err(WireError::FrameTooLarge(archive.len() as u64)),
    };
    Ok(FrameParts {
        header: length.to_le_bytes(),
        archive,
    })
}

/// The archive length a frame header announces, refusing oversized frames
/// before the caller reads (or allocates for) the rest.
pub fn frame_length(header: [u8; LENGTH_BYTES]) -> Result<usize, WireError> {
    let length = u32::from_le_bytes(header);
    if length > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge(length as u64));
    }
    Ok(length as usize)
}

/// Decodes one whole frame (length prefix included): validates the archive,
/// then the protocol's rules.
pub fn decode_frame(frame: &[u8]) -> Result<PeerMessage, WireError> {
    let Some((header, archive)) = frame.split_first_chunk::<LENGTH_BYTES>() else {
        return Err(WireError::Truncated {
            have: frame.len(),
            need: LENGTH_BYTES,
        });
    };
    let length = frame_length(*header)?;
    if archive.len() != length {
        return Err(WireError::Truncated {
            have: archive.len(),
            need: length,
        });
    }
    // rkyv reads archives in place and needs them aligned; bytes off a
    // socket are not.
    let mut aligned = ArchiveBuffer::with_capacity(archive.len());
    aligned.extend_from_slice(archive);
    decode_archive(&aligned)
}

/// Decodes one archive (a frame without its length prefix, which the
/// caller checked with [`frame_length`]) received straight into an aligned
/// buffer: validates it, then the protocol's rules.
pub fn decode_archive(archive: &ArchiveBuffer) -> Result<PeerMessage, WireError> {
    if archive.len() > FRAME_BYTES_MAX as usize {
        return Err(WireError::FrameTooLarge(archive.len() as u64));
    }
    let message = rkyv::from_bytes::<PeerMessage, rancor::Error>(archive)
        .map_err(|error| WireError::Malformed(error.to_string()))?;
    message.check()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_in_parts_is_the_frame_and_its_archive_decodes_in_place() {
        let message = PeerMessage::Journaled { group: 3, seq: 9 };
        let parts = encode_frame_parts(&message).expect("encodes");
        let frame = encode_frame(&message).expect("encodes");
        assert_eq!(parts.wire_bytes(), frame.len());
        assert_eq!(parts.header[..], frame[..LENGTH_BYTES]);
        assert_eq!(parts.archive[..], frame[LENGTH_BYTES..]);
        assert_eq!(
            frame_length(parts.header).expect("length"),
            parts.archive.len()
        );
        assert_eq!(decode_archive(&parts.archive).expect("decodes"), message);
    }

    #[test]
    fn a_malformed_archive_is_an_error() {
        let mut archive = ArchiveBuffer::new();
        archive.extend_from_slice(&[0xa5; 64]);
        assert!(matches!(
            decode_archive(&archive),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode_archive(&ArchiveBuffer::new()),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn an_archive_over_the_frame_limit_is_refused_before_it_is_read() {
        let mut archive = ArchiveBuffer::new();
        archive.resize(FRAME_BYTES_MAX as usize, 0xa5);
        // At the limit: read, and found malformed.
        let at_limit = decode_archive(&archive);
        assert!(
            matches!(at_limit, Err(WireError::Malformed(_))),
            "{at_limit:?}"
        );
        archive.push(0xa5);
        assert_eq!(
            decode_archive(&archive),
            Err(WireError::FrameTooLarge(u64::from(FRAME_BYTES_MAX) + 1))
        );
    }
}
