//! Durable state of a stretch node, behind a [`FileSystem`] so the same code
//! runs on real files and on the simulator's disk.
//!
//! - [`Journal`]: the redo log of deltas, in segments; checksummed records,
//!   so a torn tail is found and dropped, never replayed.
//! - [`Leg`]: a volume's back-end copy, a preallocated sparse file.
//! - [`VolumeRecord`]: a volume as a node keeps it, and the rules for
//!   volume names and sizes.
//! - [`recover`]: crash recovery: replays the journal onto the legs in order
//!   and syncs them, so every leg is the image after a whole delta.
//! - [`start`]: a node's whole start from its durable state (recovery, the
//!   fresh journal segment, the maps of what other sites lack, the resync
//!   marks), the same for the runtime and the simulator.

mod dirty_map;
mod fast_drain_log;
mod filesystem;
mod journal;
mod leg;
mod recovery;
mod resync_marks;
mod sim_filesystem;
mod start;
mod volume;

pub use dirty_map::{DirtyMapError, Regions, load_dirty_map, save_dirty_map};
pub use fast_drain_log::{DrainLog, DrainLogError, append_fast_drain_log, load_fast_drain_log};
pub use filesystem::{FileSystem, OsFileSystem, StorageFile};
pub use journal::{Journal, JournalError, MAX_RECORD_BYTES, decode_record, encode_record};
pub use leg::{Leg, LegError, apply_to_legs};
pub use recovery::{Recovery, RecoveryError, recover};
pub use resync_marks::{ResyncMarksError, load_resync_marks, save_resync_marks};
pub use sim_filesystem::{CHANGE_CHUNK_BYTES, ContentMark, CrashChooser, SimFileSystem};
pub use start::{StartError, StartPaths, Started, start};
pub use volume::{
    CatalogError, VOLUME_BYTES_MAX, VolumeRecord, validate_volume_name, validate_volume_size,
};
