//! The message set and the protocol's rules on it.

use stretch_core::{BLOCK_SIZE, LEASE_REGIONS_MAX, LOST_REGIONS_MAX};

use crate::frame::{FRAME_BYTES_MAX, WireError};

/// Version of this message set, exchanged in [`PeerMessage::Hello`]. 5:
/// Raft RPC carriers ([`PeerMessage::RaftRequest`],
/// [`PeerMessage::RaftReply`]) replace the catalog exchange messages.
/// 7: a resume names the regions a failover's lost deltas wrote.
/// 8: a block's payload may travel LZ4-compressed ([`WirePayload::Lz4`]).
pub const PROTOCOL_VERSION: u32 = 10;

/// Longest name (cluster, node, site) in a message.
pub const NAME_BYTES_MAX: usize = 255;

/// Largest metadata request or reply body, bytes: a metadata snapshot of
/// many thousand volumes fits.
pub const METADATA_BYTES_MAX: usize = 16 << 20;

/// Largest write a site forwards to a volume's owner, the largest write a
/// client may send.
pub const WRITE_BYTES_MAX: usize = 32 << 20;

/// One resync region in a message: its volume and index (first block /
/// the region size).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct WireRegion {
    pub volume: u32,
    pub region: u64,
}

/// One block in a message: its volume and index, and its content.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireBlock {
    pub volume: u32,
    pub block: u64,
    pub payload: WirePayload,
}

/// A block's content in a message.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WirePayload {
    /// Every byte zero.
    Zero,
    /// The block's [`BLOCK_SIZE`] bytes.
    Raw(Vec<u8>),
    /// The block's bytes as one LZ4 block, shorter than [`BLOCK_SIZE`]
    /// (a block that does not shrink travels raw).
    Lz4(Vec<u8>),
}

/// A client request sent to the volume's owner: [`stretch_core::Request`]
/// on the wire.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WireRequest {
    Read {
        volume: u32,
        offset: u64,
        length: u64,
    },
    ReadSnapshot {
        volume: u32,
        offset: u64,
        length: u64,
    },
    Write {
        volume: u32,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    WriteZeroes {
        volume: u32,
        offset: u64,
        length: u64,
        fua: bool,
    },
    Trim {
        volume: u32,
        offset: u64,
        length: u64,
    },
    Flush {
        volume: u32,
    },
}

/// The successful outcome of a forwarded request:
/// [`stretch_core::Response`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WireResponse {
    Done,
    Data(Vec<u8>),
}

/// Why a request failed at the owner: [`stretch_core::RequestError`] on the
/// wire.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum WireFailure {
    NoVolume(u32),
    OutOfRange { offset: u64, length: u64, size: u64 },
    TooLarge { length: u64, cache_bytes_max: u64 },
    Io(String),
    Failed(String),
}

/// Everything one node says to another: the engines' messages
/// ([`stretch_core::SiteMessage`], see [`PeerMessage::from_site`]) and the
/// nodes' own.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PeerMessage {
    /// First message on a connection, each way.
    Hello {
        protocol: u32,
        cluster: String,
        node: String,
        site: String,
    },

    // Between engines, on a group's ordered stream.
    /// Owner to replica: a closed delta of a group, shipped in
    /// `(group, epoch, seq)` order, or the deltas `first..=seq` merged
    /// into one (a lone delta has `first == seq`).
    Delta {
        group: u32,
        epoch: u64,
        first: u64,
        seq: u64,
        blocks: Vec<WireBlock>,
    },
    /// Replica to owner: the deltas of the group up to `seq` are in the
    /// replica's journal, durably.
    Journaled { group: u32, seq: u64 },
    /// Replica to owner: the deltas of the group up to `seq` are on the
    /// replica's legs.
    Applied { group: u32, seq: u64 },
    /// Replica to owner: the replica holds the deltas up to `have` (none:
    /// its image is at no delta boundary) and wants the ones after it.
    /// `resume` names this request; the resync answering it carries it.
    Resume {
        group: u32,
        have: Option<u64>,
        /// The epoch the delta `have` was written under, if known: an
        /// owner whose history names another epoch for it resyncs the
        /// replica whole (it wrote deltas the owner never had).
        have_epoch: Option<u64>,
        /// From an old owner whose deltas past a failover were lost: the
        /// regions they wrote, strictly increasing, at most
        /// [`LOST_REGIONS_MAX`]; none if not known.
        lost_regions: Option<Vec<WireRegion>>,
        resume: u64,
    },
    /// Owner to replica: current images of blocks the replica may lack.
    Resync {
        group: u32,
        blocks: Vec<WireBlock>,
        last: bool,
        base: u64,
        consistent_at: u64,
        /// The owner's epoch of delta `consistent_at`.
        consistent_epoch: Option<u64>,
        resume: u64,
    },
    /// Replica to owner: one more resync chunk (of the resync answering
    /// `resume`) is on the replica's legs.
    ResyncAck { group: u32, resume: u64 },
    /// Owner to replica: the owner tracks what the replica lacks as
    /// regions now; the replica resumes to be resynced.
    Rejoin { group: u32 },

    // Between engines, on request streams.
    /// Replica to owner: strict read `id` of a byte range, wanting only the
    /// blocks written after delta `have` of the volume's group.
    ReadRequest {
        id: u64,
        volume: u32,
        offset: u64,
        length: u64,
        have: Option<u64>,
    },
    /// Owner to replica: the blocks of the range newer than `have`.
    ReadReply {
        id: u64,
        result: Result<Vec<WireBlock>, WireFailure>,
    },
    /// Replica to owner: a request issued at a site that does not own the
    /// volume.
    Forward { id: u64, request: WireRequest },
    /// Owner to replica: the outcome of a forwarded request.
    ForwardReply {
        id: u64,
        result: Result<WireResponse, WireFailure>,
    },
    /// Replica to owner: a read lease on `regions` regions of `volume`
    /// from `first_region` (1 to [`LEASE_REGIONS_MAX`]), holding the
    /// group's deltas up to `have`.
    LeaseRequest {
        id: u64,
        volume: u32,
        first_region: u64,
        regions: u64,
        have: u64,
    },
    /// Owner to replica: lease request `id` granted for `lease_ms` (0:
    /// refused).
    LeaseReply { id: u64, lease_ms: u64 },
    /// Owner to replica: drop the read leases on `regions` (strictly
    /// increasing, at most [`LEASE_REGIONS_MAX`]) of `group`, or on all of
    /// the group if `all`.
    LeaseRevoke {
        id: u64,
        group: u32,
        regions: Vec<WireRegion>,
        all: bool,
    },
    /// Replica to owner: revocation `id` is done.
    LeaseRevoked { id: u64 },

    // Between nodes, not engines.
    /// A metadata request to another node: a Raft RPC (append entries,
    /// vote, snapshot) or a request forwarded to the Raft leader, as the
    /// JSON the node's metadata module encodes (openraft's messages are
    /// serde types). Answered with a [`PeerMessage::RaftReply`] carrying
    /// the same `request`.
    RaftRequest { request: u64, body: Vec<u8> },
    /// The answer to [`PeerMessage::RaftRequest`] `request`, JSON likewise.
    RaftReply { request: u64, body: Vec<u8> },
}

impl PeerMessage {
    /// The protocol's own rules, beyond what the archive format checks.
    pub(crate) fn check(&self) -> Result<(), WireError> {
        match self {
            PeerMessage::Hello {
                cluster,
                node,
                site,
                ..
            } => {
                check_name("cluster", cluster, NAME_BYTES_MAX)?;
                check_name("node", node, NAME_BYTES_MAX)?;
                check_name("site", site, NAME_BYTES_MAX)
            }
            PeerMessage::Delta {
                first, seq, blocks, ..
            } => {
                if first > seq {
                    return Err(invalid(format!("deltas {first} to {seq}")));
                }
                check_blocks(blocks)
            }
            PeerMessage::Resync { blocks, .. } => check_blocks(blocks),
            PeerMessage::ReadReply { result, .. } => match result {
                Ok(blocks) => check_blocks(blocks),
                Err(_) => Ok(()),
            },
            PeerMessage::ReadRequest { length, .. } => {
                if *length == 0 || *length > u64::from(FRAME_BYTES_MAX) {
                    return Err(invalid(format!("strict read of {length} bytes")));
                }
                Ok(())
            }
            PeerMessage::Forward { request, .. } => check_request(request),
            PeerMessage::RaftRequest { request, body } => {
                check_metadata("metadata request", *request, body)
            }
            PeerMessage::RaftReply { request, body } => {
                check_metadata("metadata reply", *request, body)
            }
            PeerMessage::Resume {
                lost_regions: Some(regions),
                ..
            } => check_regions("lost", regions, LOST_REGIONS_MAX),
            PeerMessage::LeaseRevoke { regions, .. } => {
                check_regions("revoked", regions, LEASE_REGIONS_MAX)
            }
            PeerMessage::LeaseRequest { regions, .. } => {
                if *regions == 0 || *regions > LEASE_REGIONS_MAX as u64 {
                    return Err(invalid(format!(
                        "lease asked on {regions} regions, not 1 to {LEASE_REGIONS_MAX}"
                    )));
                }
                Ok(())
            }
            PeerMessage::Journaled { .. }
            | PeerMessage::Applied { .. }
            | PeerMessage::Resume { .. }
            | PeerMessage::ResyncAck { .. }
            | PeerMessage::Rejoin { .. }
            | PeerMessage::ForwardReply { .. }
            | PeerMessage::LeaseReply { .. }
            | PeerMessage::LeaseRevoked { .. } => Ok(()),
        }
    }
}

fn invalid(reason: String) -> WireError {
    WireError::Invalid(reason)
}

fn check_name(what: &str, name: &str, bytes_max: usize) -> Result<(), WireError> {
    if name.len() > bytes_max {
        return Err(invalid(format!(
            "{what} name of {} bytes is over {bytes_max}",
            name.len()
        )));
    }
    Ok(())
}

/// At most `max` regions, strictly increasing.
fn check_regions(what: &str, regions: &[WireRegion], max: usize) -> Result<(), WireError> {
    if regions.len() > max {
        return Err(invalid(format!(
            "{} {what} regions, over {max}",
            regions.len()
        )));
    }
    if regions.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err(invalid(format!("{what} regions out of order")));
    }
    Ok(())
}

/// Every block whole, zero or compressed shorter than a block, keys
/// strictly increasing. (Whether a compressed block expands to exactly
/// one block is checked as it is expanded, in [`PeerMessage::into_site`].)
fn check_blocks(blocks: &[WireBlock]) -> Result<(), WireError> {
    let mut previous: Option<(u32, u64)> = None;
    for block in blocks {
        let wrong = match &block.payload {
            WirePayload::Zero => None,
            WirePayload::Raw(data) => (data.len() != BLOCK_SIZE).then_some(data.len()),
            WirePayload::Lz4(data) => {
                (data.is_empty() || data.len() >= BLOCK_SIZE).then_some(data.len())
            }
        };
        if let Some(length) = wrong {
            return Err(invalid(format!(
                "block {} of volume {} has {length} bytes ({})",
                block.block,
                block.volume,
                match block.payload {
                    WirePayload::Lz4(_) => "compressed, so 1 to one less than a block",
                    _ => "raw, so exactly one block",
                }
            )));
        }
        let key = (block.volume, block.block);
        if previous.is_some_and(|previous| previous >= key) {
            return Err(invalid("blocks not in strictly increasing order".into()));
        }
        previous = Some(key);
    }
    Ok(())
}

fn check_request(request: &WireRequest) -> Result<(), WireError> {
    match request {
        WireRequest::Write { data, .. } if data.len() > WRITE_BYTES_MAX => Err(invalid(format!(
            "forwarded write of {} bytes is over {WRITE_BYTES_MAX}",
            data.len()
        ))),
        // The answer must fit in one frame.
        WireRequest::Read { length, .. } | WireRequest::ReadSnapshot { length, .. }
            if *length > u64::from(FRAME_BYTES_MAX) =>
        {
            Err(invalid(format!("forwarded read of {length} bytes")))
        }
        _ => Ok(()),
    }
}

/// A metadata request or reply: numbered (0 is never issued), with a body
/// of 1 to [`METADATA_BYTES_MAX`] bytes.
fn check_metadata(what: &str, request: u64, body: &[u8]) -> Result<(), WireError> {
    if request == 0 {
        return Err(invalid(format!("{what} numbered 0")));
    }
    if body.is_empty() {
        return Err(invalid(format!("{what} {request} has an empty body")));
    }
    if body.len() > METADATA_BYTES_MAX {
        return Err(invalid(format!(
            "{what} {request} of {} bytes is over {METADATA_BYTES_MAX}",
            body.len()
        )));
    }
    Ok(())
}
