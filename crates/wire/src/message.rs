//! The message set and its framing.

use bytes::Bytes;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use stretch_core::{
    BLOCK_SIZE, BlockImage, BlockKey, DeltaRecord, DeltaSeq, Epoch, GroupId, JournalPosition,
    VolumeId,
};

/// Version of this message set, exchanged in [`PeerMessage::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame accepted: a delta of 32 MiB of blocks plus its keys.
pub const FRAME_BYTES_MAX: u32 = 40 << 20;

/// Bytes of the length prefix before each archive.
const LENGTH_BYTES: usize = 4;

/// Longest name (cluster, node) in a hello.
const NAME_BYTES_MAX: usize = 255;

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

/// One block in a message: its volume and index, and its 4096 bytes, or
/// none for a zeroed block.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireBlock {
    pub volume: u32,
    pub block: u64,
    pub data: Option<Vec<u8>>,
}

/// Everything one node says to another.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PeerMessage {
    /// First message on a connection.
    Hello {
        protocol: u32,
        cluster: String,
        node: String,
    },
    /// A closed delta of a group, shipped in `(group, epoch, seq)` order.
    Delta {
        group: u32,
        epoch: u64,
        seq: u64,
        blocks: Vec<WireBlock>,
    },
    /// The sender's journal holds the delta durably.
    DeltaAck { group: u32, epoch: u64, seq: u64 },
    /// A strict read at a non-owner: the range, and the newest delta of the
    /// group the asking site holds, so the owner sends only newer blocks.
    ReadRequest {
        request: u64,
        volume: u32,
        offset: u64,
        length: u32,
        have_seq: u64,
    },
    /// The owner's answer: the blocks of the range newer than `have_seq`.
    ReadReply {
        request: u64,
        owner_seq: u64,
        blocks: Vec<WireBlock>,
    },
    /// The owner could not answer.
    ReadFailed { request: u64, reason: String },
}

impl PeerMessage {
    /// A delta as shipped (its journal position is local to each node).
    pub fn from_delta(record: &DeltaRecord) -> Self {
        PeerMessage::Delta {
            group: record.group.0,
            epoch: record.epoch.0,
            seq: record.seq.0,
            blocks: record
                .blocks
                .iter()
                .map(|(key, image)| WireBlock {
                    volume: key.volume.0,
                    block: key.block,
                    data: match image {
                        BlockImage::Data(data) => Some(data.to_vec()),
                        BlockImage::Zero => None,
                    },
                })
                .collect(),
        }
    }

    /// A received delta as a record for the local journal at `position`.
    /// None if this message is not a delta.
    pub fn into_delta(self, position: JournalPosition) -> Option<DeltaRecord> {
        let PeerMessage::Delta {
            group,
            epoch,
            seq,
            blocks,
        } = self
        else {
            return None;
        };
        Some(DeltaRecord {
            position,
            group: GroupId(group),
            epoch: Epoch(epoch),
            seq: DeltaSeq(seq),
            blocks: blocks
                .into_iter()
                .map(|block| {
                    let key = BlockKey {
                        volume: VolumeId(block.volume),
                        block: block.block,
                    };
                    let image = match block.data {
                        Some(data) => BlockImage::Data(Bytes::from(data)),
                        None => BlockImage::Zero,
                    };
                    (key, image)
                })
                .collect(),
        })
    }

    /// The protocol's own rules, beyond what the archive format checks.
    fn check(&self) -> Result<(), WireError> {
        match self {
            PeerMessage::Hello { cluster, node, .. } => {
                if cluster.len() > NAME_BYTES_MAX || node.len() > NAME_BYTES_MAX {
                    return Err(WireError::Invalid("name too long in hello".into()));
                }
                Ok(())
            }
            PeerMessage::Delta { blocks, .. } => check_blocks(blocks),
            PeerMessage::ReadReply { blocks, .. } => check_blocks(blocks),
            PeerMessage::ReadRequest { length, .. } => {
                if *length == 0 || *length > FRAME_BYTES_MAX {
                    return Err(WireError::Invalid(format!("read length {length}")));
                }
                Ok(())
            }
            PeerMessage::DeltaAck { .. } | PeerMessage::ReadFailed { .. } => Ok(()),
        }
    }
}

fn check_blocks(blocks: &[WireBlock]) -> Result<(), WireError> {
    let mut previous: Option<(u32, u64)> = None;
    for block in blocks {
        if let Some(data) = &block.data
            && data.len() != BLOCK_SIZE
        {
            return Err(WireError::Invalid(format!(
                "block {} of volume {} has {} bytes",
                block.block,
                block.volume,
                data.len()
            )));
        }
        let key = (block.volume, block.block);
        if previous.is_some_and(|previous| previous >= key) {
            return Err(WireError::Invalid(
                "blocks not in strictly increasing order".into(),
            ));
        }
        previous = Some(key);
    }
    Ok(())
}

/// Encodes a message as one frame.
pub fn encode_frame(message: &PeerMessage) -> Vec<u8> {
    let archive = rkyv::to_bytes::<rancor::Error>(message)
        .expect("wire invariant: serialising plain owned data into memory cannot fail");
    let mut frame = Vec::with_capacity(LENGTH_BYTES + archive.len());
    frame.extend_from_slice(&(archive.len() as u32).to_le_bytes());
    frame.extend_from_slice(&archive);
    frame
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

/// Decodes one whole frame (length prefix included).
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
