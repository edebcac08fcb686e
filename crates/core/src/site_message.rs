//! What the engines of two sites say to each other. The driver carries
//! these over the network (see the wire crate for their encoding) and
//! hands received ones to [`crate::Engine::receive`].

use crate::action::{DeltaRecord, Request, RequestError, Response};
use crate::types::{BlockImage, BlockKey, DeltaSeq, Epoch, GroupId, VolumeId};

/// Most regions one [`SiteMessage::Resume`] names as lost: 1 Mi regions
/// of 1 MiB (16 MiB on the wire) name 1 TiB written past a failover;
/// past it the owner copies every region.
pub const LOST_REGIONS_MAX: usize = 1 << 20;

/// Most regions one [`SiteMessage::LeaseRequest`] asks for, and one
/// [`SiteMessage::LeaseRevoke`] names.
pub const LEASE_REGIONS_MAX: usize = 4096;

/// Which stream a message travels on. Deltas and their acks of one group
/// need one ordered stream; reads and forwarded requests go on their own
/// streams so that a large delta never delays a small read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Group(GroupId),
    Request,
}

/// One message between the engines of two sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteMessage {
    /// Owner to replica: a closed delta, sent in `(group, epoch, seq)`
    /// order. Its `position` is meaningless to the receiver.
    Delta(DeltaRecord),
    /// Owner to replica: the closed deltas `first..=record.seq` of one
    /// epoch merged into one record, each block at its newest image in
    /// them, sent instead of those deltas while the site is behind (a
    /// block rewritten in many of them crosses the link once). Applied
    /// onto any image after a delta from `first - 1` to `record.seq`, it
    /// gives the image after `record.seq`: every block those deltas wrote
    /// is in it, at its image then. A replica takes it as it would delta
    /// `record.seq`, whole or not at all, so its legs still pass only
    /// through whole-delta images (G3, at a coarser grain).
    Deltas {
        first: DeltaSeq,
        record: DeltaRecord,
    },
    /// Replica to owner: every delta of the group up to `seq` is in the
    /// replica's journal, durably.
    Journaled { group: GroupId, seq: DeltaSeq },
    /// Replica to owner: every delta of the group up to `seq` is on the
    /// replica's legs.
    Applied { group: GroupId, seq: DeltaSeq },
    /// Replica to owner, when a connection comes up: the replica holds the
    /// group's deltas up to `have` and wants the ones after it. `None`
    /// means its image is not at any delta boundary (a resync was cut
    /// short) and it needs every region the owner marked dirty for it.
    Resume {
        group: GroupId,
        have: Option<DeltaSeq>,
        /// The epoch delta `have` was written under, as the replica knows
        /// it (`None`: unknown, or `have` is `None`). An owner whose epoch
        /// history says that seq was written under another epoch knows
        /// the replica's image diverged from its own (the replica owned
        /// the group once and wrote deltas the cluster lost) and copies
        /// every region instead of streaming.
        have_epoch: Option<Epoch>,
        /// From a site that owned the group until a failover and kept
        /// writing: every region its deltas past the failover point may
        /// have written (a superset), so that the owner copies only those
        /// and the ones it wrote since instead of every region. `None`:
        /// not known here (this site restarted since, or lost track), or
        /// more than [`LOST_REGIONS_MAX`].
        lost_regions: Option<Vec<(VolumeId, u64)>>,
        /// Names this resume: the chunks of the resync it starts, and their
        /// acknowledgements, carry it, so that what was sent for an earlier
        /// resume (still on its way when this one was sent) is told apart
        /// and ignored. Unique across the replica's restarts.
        resume: u64,
    },
    /// Owner to replica: current images of blocks the replica may lack,
    /// sent when retained deltas cannot bring it up to date. The replica's
    /// leg is not at a delta boundary until the `last` chunk arrived and
    /// the deltas up to `consistent_at` were applied after it.
    Resync {
        group: GroupId,
        blocks: Vec<(BlockKey, BlockImage)>,
        last: bool,
        /// The deltas after this one follow on the same stream.
        base: DeltaSeq,
        consistent_at: DeltaSeq,
        /// The epoch the owner's delta `consistent_at` was written under,
        /// if the owner knows it: what the replica reports in its next
        /// resume once the resync is whole.
        consistent_epoch: Option<Epoch>,
        /// The [`SiteMessage::Resume`] this resync answers.
        resume: u64,
    },
    /// Replica to owner: one more [`SiteMessage::Resync`] chunk of the
    /// resync answering resume `resume` is on the replica's legs (so the
    /// owner's window of chunks in flight bounds the replica's memory);
    /// chunks are acknowledged in order.
    ResyncAck { group: GroupId, resume: u64 },
    /// Owner to replica: the owner stopped keeping the group's deltas for
    /// this site (it fell behind by more than the backlog bound allows for
    /// longer than `backlog_wait_ms_max`) and tracks the regions it missed
    /// instead; the replica resumes, and is resynced by region.
    Rejoin { group: GroupId },
    /// Replica to owner: the strict read `id` of a block range. The owner
    /// answers with only the blocks written after delta `have` of the
    /// volume's group (or all of them when `have` is `None`).
    ReadRequest {
        id: u64,
        request: Request,
        have: Option<DeltaSeq>,
    },
    /// Owner to replica: the blocks of the range newer than `have`.
    ReadReply {
        id: u64,
        result: Result<Vec<(BlockKey, BlockImage)>, RequestError>,
    },
    /// Replica to owner: asks for a read lease on regions `first_region ..
    /// first_region + regions` of `volume`, holding every delta of its
    /// group up to `have` (see the engine's `read_lease` module).
    LeaseRequest {
        id: u64,
        volume: VolumeId,
        first_region: u64,
        regions: u64,
        have: DeltaSeq,
    },
    /// Owner to replica: lease request `id` is granted for `lease_ms`,
    /// counted from when the replica asked; 0: refused.
    LeaseReply { id: u64, lease_ms: u64 },
    /// Owner to replica: drop the read leases on `regions` of `group`
    /// (every lease on the group's volumes if `all`), and say so.
    LeaseRevoke {
        id: u64,
        group: GroupId,
        regions: Vec<(VolumeId, u64)>,
        all: bool,
    },
    /// Replica to owner: revocation `id` is done here.
    LeaseRevoked { id: u64 },
    /// Replica to owner: a write, flush, trim or zeroing issued at a site
    /// that does not own the volume.
    Forward { id: u64, request: Request },
    /// Owner to replica: the outcome of a forwarded request.
    ForwardReply {
        id: u64,
        result: Result<Response, RequestError>,
    },
}

impl SiteMessage {
    pub fn lane(&self) -> Lane {
        match self {
            SiteMessage::Delta(record) | SiteMessage::Deltas { record, .. } => {
                Lane::Group(record.group)
            }
            SiteMessage::Journaled { group, .. }
            | SiteMessage::Applied { group, .. }
            | SiteMessage::Resume { group, .. }
            | SiteMessage::Resync { group, .. }
            | SiteMessage::ResyncAck { group, .. }
            | SiteMessage::Rejoin { group } => Lane::Group(*group),
            SiteMessage::ReadRequest { .. }
            | SiteMessage::ReadReply { .. }
            | SiteMessage::Forward { .. }
            | SiteMessage::ForwardReply { .. }
            | SiteMessage::LeaseRequest { .. }
            | SiteMessage::LeaseReply { .. }
            | SiteMessage::LeaseRevoke { .. }
            | SiteMessage::LeaseRevoked { .. } => Lane::Request,
        }
    }
}
