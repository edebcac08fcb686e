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

/// Encodes a message as one frame, refusing what a peer would refuse: a
/// message breaking the protocol's rules, or a frame over
/// [`FRAME_BYTES_MAX`].
pub fn encode_frame(message: &PeerMessage) -> Result<Vec<u8>, WireError> {
    message.check()?;
    let archive = rkyv::to_bytes::<rancor::Error>(message)
        .map_err(|error| WireError::Invalid(format!("cannot archive: {error}")))?;
    let length = match u32::try_from(archive.len()) {
        Ok(length) if length <= FRAME_BYTES_MAX => length,
        _ => return Err(WireError::FrameTooLarge(archive.len() as u64)),
    };
    let mut frame = Vec::with_capacity(LENGTH_BYTES + archive.len());
    frame.extend_from_slice(&length.to_le_bytes());
    frame.extend_from_slice(&archive);
    Ok(frame)
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
    let mut aligned = AlignedVec::<16>::with_capacity(archive.len());
    aligned.extend_from_slice(archive);
    let message = rkyv::from_bytes::<PeerMessage, rancor::Error>(&aligned)
        .map_err(|error| WireError::Malformed(error.to_string()))?;
    message.check()?;
    Ok(message)
}
