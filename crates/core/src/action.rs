//! What goes into the engine (requests) and what comes out (actions).

use bytes::Bytes;

use crate::site_message::SiteMessage;
use crate::types::{
    BlockImage, BlockKey, DeltaSeq, Epoch, GroupId, IoId, JournalPosition, RequestId, SiteId,
    VolumeId,
};

/// A client request against one volume. Offsets and lengths are in bytes
/// and need not be block-aligned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A strict read: at a site that does not own the volume it asks the
    /// owner for blocks newer than what the site holds (G2).
    Read {
        volume: VolumeId,
        offset: u64,
        length: u64,
    },
    /// A snapshot read: the newest whole-delta image held at this site,
    /// without a round trip to the owner.
    ReadSnapshot {
        volume: VolumeId,
        offset: u64,
        length: u64,
    },
    Write {
        volume: VolumeId,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    WriteZeroes {
        volume: VolumeId,
        offset: u64,
        length: u64,
        fua: bool,
    },
    /// A hint: the range may read back as old data or zeros afterwards.
    Trim {
        volume: VolumeId,
        offset: u64,
        length: u64,
    },
    Flush {
        volume: VolumeId,
    },
}

impl Request {
    pub fn volume(&self) -> VolumeId {
        match self {
            Request::Read { volume, .. }
            | Request::ReadSnapshot { volume, .. }
            | Request::Write { volume, .. }
            | Request::WriteZeroes { volume, .. }
            | Request::Trim { volume, .. }
            | Request::Flush { volume } => *volume,
        }
    }
}

/// The successful outcome of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Done,
    Data(Bytes),
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no volume {0}")]
    NoVolume(VolumeId),
    #[error("range {offset}+{length} is outside the volume ({size} bytes)")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("write of {length} bytes does not fit the cache ({cache_bytes_max} bytes)")]
    TooLarge { length: u64, cache_bytes_max: u64 },
    #[error("i/o error: {0}")]
    Io(String),
    /// The node stopped taking writes after a journal or leg failure:
    /// acknowledging more would promise durability it cannot give.
    #[error("node is failed after a storage error: {0}")]
    Failed(String),
}

/// A closed delta as it is journaled (and, later, shipped): every block a
/// group's writes touched in one interval, each with its final image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaRecord {
    pub position: JournalPosition,
    pub group: GroupId,
    pub epoch: Epoch,
    pub seq: DeltaSeq,
    /// Sorted by key, one entry per block.
    pub blocks: Vec<(BlockKey, BlockImage)>,
}

impl DeltaRecord {
    pub fn data_bytes(&self) -> u64 {
        self.blocks.len() as u64 * crate::types::BLOCK_SIZE as u64
    }
}

/// Work the driver must do for the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a message to the engine of another site. Messages of one
    /// [`crate::Lane`] must be delivered in order or not at all; a lost
    /// connection is reported with [`crate::Engine::peer_down`].
    Send { peer: SiteId, message: SiteMessage },
    /// Answer a client request.
    Reply {
        request: RequestId,
        result: Result<Response, RequestError>,
    },
    /// Read `length` bytes at `offset` of the volume's leg; answer with
    /// [`crate::Engine::leg_read_done`].
    ReadLeg {
        io: IoId,
        volume: VolumeId,
        offset: u64,
        length: u64,
    },
    /// Append the record to the journal (not yet durable). A failure is
    /// reported with [`crate::Engine::journal_failed`].
    AppendJournal { record: DeltaRecord },
    /// Make every record appended so far durable; answer with
    /// [`crate::Engine::journal_synced`].
    SyncJournal { io: IoId, upto: JournalPosition },
    /// Apply one delta's blocks to the legs (not yet durable); answer with
    /// [`crate::Engine::leg_written`]. Blocks of a deleted volume are left out.
    WriteLeg {
        io: IoId,
        group: GroupId,
        seq: DeltaSeq,
        blocks: Vec<(BlockKey, BlockImage)>,
    },
    /// Make every leg write so far durable on these volumes; answer with
    /// [`crate::Engine::legs_synced`].
    SyncLegs { io: IoId, volumes: Vec<VolumeId> },
    /// Journal records up to and including `upto` are on synced legs and
    /// may be deleted.
    ReleaseJournal { upto: JournalPosition },
    /// Replace, durably, the map of regions site `peer` may lack (every
    /// region, as `(volume, block / REGION_BLOCKS)`); answer with
    /// [`crate::Engine::dirty_map_saved`]. Journal records are released
    /// only after the maps covering them are saved, so a restarted owner
    /// knows what to copy to a site from the maps plus its journal.
    SaveDirtyMap {
        io: IoId,
        peer: SiteId,
        regions: Vec<(VolumeId, u64)>,
    },
    /// Replace, durably, the set of consistency groups whose legs here are
    /// mid-resync (a partial copy of the owner's image, at no delta
    /// boundary); answer with [`crate::Engine::resync_marks_saved`]. A
    /// restarted node hands the saved set back in
    /// [`crate::RecoveredState::resyncing`]. No resync chunk of a group is
    /// journaled before a save naming the group completed.
    SaveResyncMarks { io: IoId, groups: Vec<GroupId> },
    /// Append `regions` to the log of `group`'s fast drain (the switchover
    /// to this site at `epoch`), durably: they are copied, and their copies
    /// are durable in the journal. Answer with
    /// [`crate::Engine::fast_drain_saved`]. A restarted node hands every
    /// logged region back ([`crate::Engine::restore_fast_drain_log`]); no
    /// request touching a region waits for it once its append completed.
    SaveFastDrain {
        io: IoId,
        group: GroupId,
        epoch: Epoch,
        regions: Vec<(VolumeId, u64)>,
    },
}
