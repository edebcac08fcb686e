//! The protocol core of stretch: a deterministic state machine with no
//! sockets, no files and no clock.
//!
//! A driver feeds [`Engine`] events (a client request arrived, a disk
//! operation finished, time passed) together with the current [`Timestamp`],
//! and drains [`Action`]s (reply, read a leg, append to the journal, sync,
//! write a leg). The tokio runtime driver and the simulator run this same
//! code; only what executes the actions differs.
//!
//! Ordering rules the engine enforces (and the driver must respect):
//! - a delta is applied to a leg only after a journal sync covered it, so a
//!   crash can always redo it from the journal (G3);
//! - a FLUSH or FUA write is answered only after a journal sync covered every
//!   write acknowledged before it (G4);
//! - deltas of one group reach the legs strictly in sequence order, one
//!   [`Action::WriteLeg`] in flight per group at a time;
//! - journal records are released only after the legs holding them were
//!   synced ([`Action::SyncLegs`] completed).
//!
//! The driver must execute journal actions (`AppendJournal`, `SyncJournal`,
//! `ReleaseJournal`) in the order they were emitted, and leg actions
//! (`WriteLeg`, `SyncLegs`) in the order they were emitted.

mod action;
mod block_index;
mod engine;
mod link_shaper;
mod marks;
mod site_message;
mod types;

pub use action::{Action, DeltaRecord, Request, RequestError, Response};
pub use engine::{
    DELTA_RECORD_BYTES_MAX, Engine, EngineConfig, EngineStats, EpochStart, FAST_DRAIN_REGIONS_MAX,
    FastDrain, FastDrainProgress, GroupReplication, PeerReplication, PeerState, PlantedBug,
    READ_LEASE_IDLE_PERIODS_MAX, REGION_BLOCKS, ReadLeaseCounters, RecoveredState, SealedGroup,
    VolumeSpec,
};
pub use link_shaper::{DropReason, Fate, LinkProfile, LinkShaper};
pub use marks::{Mark, Marks};
pub use site_message::{LEASE_REGIONS_MAX, LOST_REGIONS_MAX, Lane, SiteMessage};
pub use types::{
    BLOCK_SIZE, BlockImage, BlockKey, DeltaSeq, Epoch, GroupId, IoId, JournalPosition, Mode,
    RequestId, SiteId, Timestamp, VolumeId,
};
