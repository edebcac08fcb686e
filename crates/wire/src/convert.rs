//! Between the engines' [`SiteMessage`]s and their wire form.

use bytes::Bytes;
use stretch_core::{
    BlockImage, BlockKey, DeltaRecord, DeltaSeq, Epoch, GroupId, JournalPosition, Request,
    RequestError, Response, SiteMessage, VolumeId,
};

use crate::compression::{Compression, Compressor, expand};
use crate::frame::WireError;
use crate::message::{
    PeerMessage, WireBlock, WireFailure, WirePayload, WireRegion, WireRequest, WireResponse,
};

impl PeerMessage {
    /// An engine's message as sent. Fails only for a message no engine
    /// builds: a [`SiteMessage::ReadRequest`] whose request is not a
    /// [`Request::Read`].
    ///
    /// Block data is copied (the engine keeps its own), compressed as
    /// `compression` says (see [`Compression`]); the protocol's rules are
    /// checked when the message is framed ([`crate::encode_frame`]).
    pub fn from_site(
        message: &SiteMessage,
        compression: Compression,
    ) -> Result<PeerMessage, WireError> {
        Ok(match message {
            SiteMessage::Delta(record) => PeerMessage::Delta {
                group: record.group.0,
                epoch: record.epoch.0,
                first: record.seq.0,
                seq: record.seq.0,
                blocks: blocks_to_wire(&record.blocks, compression),
            },
            SiteMessage::Deltas { first, record } => PeerMessage::Delta {
                group: record.group.0,
                epoch: record.epoch.0,
                first: first.0,
                seq: record.seq.0,
                blocks: blocks_to_wire(&record.blocks, compression),
            },
            SiteMessage::Journaled { group, seq } => PeerMessage::Journaled {
                group: group.0,
                seq: seq.0,
            },
            SiteMessage::Applied { group, seq } => PeerMessage::Applied {
                group: group.0,
                seq: seq.0,
            },
            SiteMessage::Resume {
                group,
                have,
                have_epoch,
                lost_regions,
                resume,
            } => PeerMessage::Resume {
                group: group.0,
                have: have.map(|have| have.0),
                have_epoch: have_epoch.map(|epoch| epoch.0),
                lost_regions: lost_regions.as_ref().map(|regions| {
                    regions
                        .iter()
                        .map(|(volume, region)| WireRegion {
                            volume: volume.0,
                            region: *region,
                        })
                        .collect()
                }),
                resume: *resume,
            },
            SiteMessage::Resync {
                group,
                blocks,
                last,
                base,
                consistent_at,
                consistent_epoch,
                resume,
            } => PeerMessage::Resync {
                group: group.0,
                blocks: blocks_to_wire(blocks, compression),
                last: *last,
                base: base.0,
                consistent_at: consistent_at.0,
                consistent_epoch: consistent_epoch.map(|epoch| epoch.0),
                resume: *resume,
            },
            SiteMessage::ResyncAck { group, resume } => PeerMessage::ResyncAck {
                group: group.0,
                resume: *resume,
            },
            SiteMessage::Rejoin { group } => PeerMessage::Rejoin { group: group.0 },
            SiteMessage::ReadRequest { id, request, have } => {
                let Request::Read {
                    volume,
                    offset,
                    length,
                } = request
                else {
                    return Err(WireError::Invalid(format!(
                        "strict read {id} carries a request other than a read: {}",
                        request_kind(request)
                    )));
                };
                PeerMessage::ReadRequest {
                    id: *id,
                    volume: volume.0,
                    offset: *offset,
                    length: *length,
                    have: have.map(|have| have.0),
                }
            }
            SiteMessage::ReadReply { id, result } => PeerMessage::ReadReply {
                id: *id,
                result: match result {
                    Ok(blocks) => Ok(blocks_to_wire(blocks, compression)),
                    Err(error) => Err(failure_to_wire(error)),
                },
            },
            SiteMessage::Forward { id, request } => PeerMessage::Forward {
                id: *id,
                request: request_to_wire(request),
            },
            SiteMessage::LeaseRequest {
                id,
                volume,
                first_region,
                regions,
                have,
            } => PeerMessage::LeaseRequest {
                id: *id,
                volume: volume.0,
                first_region: *first_region,
                regions: *regions,
                have: have.0,
            },
            SiteMessage::LeaseReply { id, lease_ms } => PeerMessage::LeaseReply {
                id: *id,
                lease_ms: *lease_ms,
            },
            SiteMessage::LeaseRevoke {
                id,
                group,
                regions,
                all,
            } => PeerMessage::LeaseRevoke {
                id: *id,
                group: group.0,
                regions: regions
                    .iter()
                    .map(|(volume, region)| WireRegion {
                        volume: volume.0,
                        region: *region,
                    })
                    .collect(),
                all: *all,
            },
            SiteMessage::LeaseRevoked { id } => PeerMessage::LeaseRevoked { id: *id },
            SiteMessage::ForwardReply { id, result } => PeerMessage::ForwardReply {
                id: *id,
                result: match result {
                    Ok(Response::Done) => Ok(WireResponse::Done),
                    Ok(Response::Data(data)) => Ok(WireResponse::Data(data.to_vec())),
                    Err(error) => Err(failure_to_wire(error)),
                },
            },
        })
    }

    /// A received message for the engine; `Ok(None)` for a hello or a
    /// metadata (Raft) message, which are the node's. A delta's journal position
    /// is local to each node: it comes out as `JournalPosition(0)` for the
    /// receiver to set.
    ///
    /// The protocol's rules are checked again (they hold for anything
    /// [`crate::decode_frame`] returned), so a message built by hand cannot
    /// hand the engine a short block or unsorted keys. Block and write data
    /// move into [`Bytes`] without a copy.
    pub fn into_site(self) -> Result<Option<SiteMessage>, WireError> {
        self.check()?;
        Ok(Some(match self {
            PeerMessage::Hello { .. }
            | PeerMessage::RaftRequest { .. }
            | PeerMessage::RaftReply { .. } => return Ok(None),
            PeerMessage::Delta {
                group,
                epoch,
                first,
                seq,
                blocks,
            } => {
                let record = DeltaRecord {
                    position: JournalPosition(0),
                    group: GroupId(group),
                    epoch: Epoch(epoch),
                    seq: DeltaSeq(seq),
                    blocks: blocks_from_wire(blocks)?,
                };
                if first == seq {
                    SiteMessage::Delta(record)
                } else {
                    SiteMessage::Deltas {
                        first: DeltaSeq(first),
                        record,
                    }
                }
            }
            PeerMessage::Journaled { group, seq } => SiteMessage::Journaled {
                group: GroupId(group),
                seq: DeltaSeq(seq),
            },
            PeerMessage::Applied { group, seq } => SiteMessage::Applied {
                group: GroupId(group),
                seq: DeltaSeq(seq),
            },
            PeerMessage::Resume {
                group,
                have,
                have_epoch,
                lost_regions,
                resume,
            } => SiteMessage::Resume {
                group: GroupId(group),
                have: have.map(DeltaSeq),
                have_epoch: have_epoch.map(Epoch),
                lost_regions: lost_regions.map(|regions| {
                    regions
                        .into_iter()
                        .map(|region| (VolumeId(region.volume), region.region))
                        .collect()
                }),
                resume,
            },
            PeerMessage::Resync {
                group,
                blocks,
                last,
                base,
                consistent_at,
                consistent_epoch,
                resume,
            } => SiteMessage::Resync {
                group: GroupId(group),
                blocks: blocks_from_wire(blocks)?,
                last,
                base: DeltaSeq(base),
                consistent_at: DeltaSeq(consistent_at),
                consistent_epoch: consistent_epoch.map(Epoch),
                resume,
            },
            PeerMessage::ResyncAck { group, resume } => SiteMessage::ResyncAck {
                group: GroupId(group),
                resume,
            },
            PeerMessage::Rejoin { group } => SiteMessage::Rejoin {
                group: GroupId(group),
            },
            PeerMessage::ReadRequest {
                id,
                volume,
                offset,
                length,
                have,
            } => SiteMessage::ReadRequest {
                id,
                request: Request::Read {
                    volume: VolumeId(volume),
                    offset,
                    length,
                },
                have: have.map(DeltaSeq),
            },
            PeerMessage::ReadReply { id, result } => SiteMessage::ReadReply {
                id,
                result: match result {
                    Ok(blocks) => Ok(blocks_from_wire(blocks)?),
                    Err(failure) => Err(failure_from_wire(failure)),
                },
            },
            PeerMessage::Forward { id, request } => SiteMessage::Forward {
                id,
                request: request_from_wire(request),
            },
            PeerMessage::LeaseRequest {
                id,
                volume,
                first_region,
                regions,
                have,
            } => SiteMessage::LeaseRequest {
                id,
                volume: VolumeId(volume),
                first_region,
                regions,
                have: DeltaSeq(have),
            },
            PeerMessage::LeaseReply { id, lease_ms } => SiteMessage::LeaseReply { id, lease_ms },
            PeerMessage::LeaseRevoke {
                id,
                group,
                regions,
                all,
            } => SiteMessage::LeaseRevoke {
                id,
                group: GroupId(group),
                regions: regions
                    .into_iter()
                    .map(|region| (VolumeId(region.volume), region.region))
                    .collect(),
                all,
            },
            PeerMessage::LeaseRevoked { id } => SiteMessage::LeaseRevoked { id },
            PeerMessage::ForwardReply { id, result } => SiteMessage::ForwardReply {
                id,
                result: match result {
                    Ok(WireResponse::Done) => Ok(Response::Done),
                    Ok(WireResponse::Data(data)) => Ok(Response::Data(Bytes::from(data))),
                    Err(failure) => Err(failure_from_wire(failure)),
                },
            },
        }))
    }
}

fn request_kind(request: &Request) -> &'static str {
    match request {
        Request::Read { .. } => "read",
        Request::ReadSnapshot { .. } => "snapshot read",
        Request::Write { .. } => "write",
        Request::WriteZeroes { .. } => "write zeroes",
        Request::Trim { .. } => "trim",
        Request::Flush { .. } => "flush",
    }
}

fn blocks_to_wire(blocks: &[(BlockKey, BlockImage)], compression: Compression) -> Vec<WireBlock> {
    let mut compressor = Compressor::new(compression);
    blocks
        .iter()
        .map(|(key, image)| WireBlock {
            volume: key.volume.0,
            block: key.block,
            payload: match image {
                BlockImage::Data(data) => compressor.payload(data),
                BlockImage::Zero => WirePayload::Zero,
            },
        })
        .collect()
}

/// The blocks as the engine takes them, compressed ones expanded (one
/// that does not come to exactly one block is refused).
fn blocks_from_wire(blocks: Vec<WireBlock>) -> Result<Vec<(BlockKey, BlockImage)>, WireError> {
    blocks
        .into_iter()
        .map(|block| {
            let key = BlockKey {
                volume: VolumeId(block.volume),
                block: block.block,
            };
            let image = match block.payload {
                WirePayload::Raw(data) => BlockImage::Data(Bytes::from(data)),
                WirePayload::Lz4(compressed) => BlockImage::Data(Bytes::from(expand(&compressed)?)),
                WirePayload::Zero => BlockImage::Zero,
            };
            Ok((key, image))
        })
        .collect()
}

fn request_to_wire(request: &Request) -> WireRequest {
    match request {
        Request::Read {
            volume,
            offset,
            length,
        } => WireRequest::Read {
            volume: volume.0,
            offset: *offset,
            length: *length,
        },
        Request::ReadSnapshot {
            volume,
            offset,
            length,
        } => WireRequest::ReadSnapshot {
            volume: volume.0,
            offset: *offset,
            length: *length,
        },
        Request::Write {
            volume,
            offset,
            data,
            fua,
        } => WireRequest::Write {
            volume: volume.0,
            offset: *offset,
            data: data.to_vec(),
            fua: *fua,
        },
        Request::WriteZeroes {
            volume,
            offset,
            length,
            fua,
        } => WireRequest::WriteZeroes {
            volume: volume.0,
            offset: *offset,
            length: *length,
            fua: *fua,
        },
        Request::Trim {
            volume,
            offset,
            length,
        } => WireRequest::Trim {
            volume: volume.0,
            offset: *offset,
            length: *length,
        },
        Request::Flush { volume } => WireRequest::Flush { volume: volume.0 },
    }
}

fn request_from_wire(request: WireRequest) -> Request {
    match request {
        WireRequest::Read {
            volume,
            offset,
            length,
        } => Request::Read {
            volume: VolumeId(volume),
            offset,
            length,
        },
        WireRequest::ReadSnapshot {
            volume,
            offset,
            length,
        } => Request::ReadSnapshot {
            volume: VolumeId(volume),
            offset,
            length,
        },
        WireRequest::Write {
            volume,
            offset,
            data,
            fua,
        } => Request::Write {
            volume: VolumeId(volume),
            offset,
            data: Bytes::from(data),
            fua,
        },
        WireRequest::WriteZeroes {
            volume,
            offset,
            length,
            fua,
        } => Request::WriteZeroes {
            volume: VolumeId(volume),
            offset,
            length,
            fua,
        },
        WireRequest::Trim {
            volume,
            offset,
            length,
        } => Request::Trim {
            volume: VolumeId(volume),
            offset,
            length,
        },
        WireRequest::Flush { volume } => Request::Flush {
            volume: VolumeId(volume),
        },
    }
}

fn failure_to_wire(error: &RequestError) -> WireFailure {
    match error {
        RequestError::NoVolume(volume) => WireFailure::NoVolume(volume.0),
        RequestError::OutOfRange {
            offset,
            length,
            size,
        } => WireFailure::OutOfRange {
            offset: *offset,
            length: *length,
            size: *size,
        },
        RequestError::TooLarge {
            length,
            cache_bytes_max,
        } => WireFailure::TooLarge {
            length: *length,
            cache_bytes_max: *cache_bytes_max,
        },
        RequestError::Io(reason) => WireFailure::Io(reason.clone()),
        RequestError::Failed(reason) => WireFailure::Failed(reason.clone()),
    }
}

fn failure_from_wire(failure: WireFailure) -> RequestError {
    match failure {
        WireFailure::NoVolume(volume) => RequestError::NoVolume(VolumeId(volume)),
        WireFailure::OutOfRange {
            offset,
            length,
            size,
        } => RequestError::OutOfRange {
            offset,
            length,
            size,
        },
        WireFailure::TooLarge {
            length,
            cache_bytes_max,
        } => RequestError::TooLarge {
            length,
            cache_bytes_max,
        },
        WireFailure::Io(reason) => RequestError::Io(reason),
        WireFailure::Failed(reason) => RequestError::Failed(reason),
    }
}
