//! A node's start from its durable state, the one sequence the runtime and
//! the simulator both run (so what the simulator proves about restarts is
//! what a node does).
//!
//! The order, each step for a reason:
//! 1. [`recover`] replays the journal onto the legs and syncs them: every
//!    leg is the image after a whole delta;
//! 2. a fresh journal segment is started after the last replayed position,
//!    so nothing new is written into a segment about to be deleted;
//! 3. each other site's map of the regions it may lack gains the regions
//!    the journal replayed (a lagging site may lack them) and is saved
//!    again; a site's first start saves empty maps (no delta was ever
//!    released, so the others lack nothing);
//! 4. only then are the replayed segments deleted: from here on only the
//!    maps name those regions;
//! 5. the resync marks say which groups' legs were mid-resync (at no delta
//!    boundary), and the fast drain log which regions a fast migration's
//!    target copied already.
//!
//! What comes out is handed to the engine: [`Started::state`] to
//! `Engine::new`, [`Started::restore_fast_drain_log`] before it learns who
//! owns what, [`Started::restore_maps`] once its volumes and owners are
//! known.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stretch_core::{Engine, RecoveredState, SiteId, VolumeId};

use crate::{
    DirtyMapError, DrainLog, DrainLogError, FileSystem, Journal, JournalError, Leg, Recovery,
    RecoveryError, Regions, ResyncMarksError, load_dirty_map, load_fast_drain_log,
    load_resync_marks, recover, save_dirty_map,
};

/// Where a node keeps what [`start`] reads.
#[derive(Debug, Clone)]
pub struct StartPaths {
    pub journal_dir: PathBuf,
    pub resync_marks: PathBuf,
    pub fast_drain_log: PathBuf,
    /// Per other data site, its map of the regions it may lack.
    pub dirty_maps: BTreeMap<SiteId, PathBuf>,
}

/// The durable state a node starts from.
pub struct Started<F: FileSystem> {
    /// Open on a fresh segment.
    pub journal: Journal<F>,
    /// What the replay did (for the log and the simulator's checks).
    pub recovery: Recovery,
    /// For `Engine::new`; `next_remote_id` is the caller's to set (see its
    /// docs: the runtime and the simulator number their runs differently).
    pub state: RecoveredState,
    /// Per other site: its saved map with the replayed regions merged in,
    /// or `None` if none was ever saved (it may lack anything).
    pub dirty_maps: BTreeMap<SiteId, Option<Regions>>,
    /// The regions fast drains copied here, by group and epoch.
    pub fast_drain_log: DrainLog,
}

impl<F: FileSystem> std::fmt::Debug for Started<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The journal holds open files that say nothing useful here.
        f.debug_struct("Started")
            .field("recovery", &self.recovery)
            .field("state", &self.state)
            .field("dirty_maps", &self.dirty_maps)
            .field("fast_drain_log", &self.fast_drain_log)
            .finish_non_exhaustive()
    }
}

impl<F: FileSystem> Started<F> {
    /// Tells `engine` what each other site may lack.
    pub fn restore_maps(&self, engine: &mut Engine) {
        for (peer, saved) in &self.dirty_maps {
            engine.restore_dirty_map(*peer, saved.clone(), &self.recovery.replayed_regions);
        }
    }

    /// Tells `engine` what its fast drains copied, before it learns which
    /// drains run.
    pub fn restore_fast_drain_log(&self, engine: &mut Engine) {
        for ((group, epoch), regions) in &self.fast_drain_log {
            engine.restore_fast_drain_log(*group, *epoch, regions.clone());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A map could not be read or is corrupt.
    #[error(transparent)]
    LoadMap(DirtyMapError),
    /// A map could not be saved (the disk refused a write or a sync).
    #[error(transparent)]
    SaveMap(DirtyMapError),
    #[error(transparent)]
    ResyncMarks(#[from] ResyncMarksError),
    #[error(transparent)]
    FastDrainLog(#[from] DrainLogError),
}

/// Runs the start sequence (see the module docs) on `legs`, opened by the
/// caller. `fresh`: this data directory never ran a node before.
pub fn start<F: FileSystem>(
    fs: &Arc<F>,
    paths: &StartPaths,
    legs: &BTreeMap<VolumeId, Leg<F>>,
    region_blocks: u64,
    journal_segment_bytes: u64,
    fresh: bool,
) -> Result<Started<F>, StartError> {
    let recovery = recover(fs, &paths.journal_dir, legs, region_blocks)?;
    let mut journal = Journal::create(
        fs.clone(),
        &paths.journal_dir,
        journal_segment_bytes,
        recovery.next_position,
        recovery.next_seq.clone(),
    )?;
    let mut dirty_maps = BTreeMap::new();
    for (peer, path) in &paths.dirty_maps {
        dirty_maps.insert(*peer, merge_replayed(fs.as_ref(), path, &recovery, fresh)?);
    }
    journal.discard_replayed(&recovery.stale_segments)?;
    let resyncing = load_resync_marks(fs.as_ref(), &paths.resync_marks)?;
    let fast_drain_log = load_fast_drain_log(fs.as_ref(), &paths.fast_drain_log)?;
    let state = RecoveredState {
        next_position: recovery.next_position,
        next_seq: recovery.next_seq.clone(),
        next_remote_id: 0,
        resyncing,
        last_epoch: recovery.last_epochs(),
    };
    Ok(Started {
        journal,
        recovery,
        state,
        dirty_maps,
        fast_drain_log,
    })
}

/// Step 3 for one site's map: the saved map with the replayed regions in
/// it, saved again if they added any.
fn merge_replayed<F: FileSystem>(
    fs: &F,
    path: &Path,
    recovery: &Recovery,
    fresh: bool,
) -> Result<Option<Regions>, StartError> {
    if fresh && !fs.exists(path) {
        save_dirty_map(fs, path, &Regions::new()).map_err(StartError::SaveMap)?;
    }
    let mut saved = load_dirty_map(fs, path).map_err(StartError::LoadMap)?;
    if let Some(regions) = &mut saved
        && !recovery.replayed_regions.is_subset(regions)
    {
        regions.extend(recovery.replayed_regions.iter().copied());
        save_dirty_map(fs, path, regions).map_err(StartError::SaveMap)?;
    }
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OsFileSystem;

    fn paths(root: &Path) -> StartPaths {
        StartPaths {
            journal_dir: root.join("journal"),
            resync_marks: root.join("resync.marks"),
            fast_drain_log: root.join("fast-drain-log"),
            dirty_maps: BTreeMap::from([(SiteId(2), root.join("dirty-b.map"))]),
        }
    }

    fn start_empty(root: &Path, fresh: bool) -> Result<Started<OsFileSystem>, StartError> {
        start(
            &Arc::new(OsFileSystem),
            &paths(root),
            &BTreeMap::new(),
            256,
            1 << 20,
            fresh,
        )
    }

    #[test]
    fn a_first_start_saves_empty_maps_and_a_later_one_without_a_map_knows_nothing() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let started = start_empty(dir.path(), true).expect("first start");
        assert_eq!(
            started.dirty_maps,
            BTreeMap::from([(SiteId(2), Some(Regions::new()))]),
            "the others lack nothing a first start wrote"
        );
        assert!(dir.path().join("dirty-b.map").exists());
        drop(started);

        // The map lost (or never saved): the other site may lack anything.
        std::fs::remove_file(dir.path().join("dirty-b.map")).expect("removing the map");
        let started = start_empty(dir.path(), false).expect("second start");
        assert_eq!(started.dirty_maps, BTreeMap::from([(SiteId(2), None)]));
        assert!(started.state.resyncing.is_empty());
    }

    #[test]
    fn a_damaged_map_stops_the_start() {
        let dir = tempfile::tempdir().expect("temporary directory");
        drop(start_empty(dir.path(), true).expect("first start"));
        std::fs::write(dir.path().join("dirty-b.map"), b"short").expect("damaging the map");
        assert!(matches!(
            start_empty(dir.path(), false),
            Err(StartError::LoadMap(DirtyMapError::Corrupt { .. }))
        ));
    }
}
