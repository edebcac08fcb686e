//! Crash recovery: replay the journal onto the legs, in order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stretch_core::{DeltaSeq, GroupId, JournalPosition, VolumeId};

use crate::filesystem::FileSystem;
use crate::journal::{JournalError, find_segments, read_records};
use crate::leg::{Leg, LegError, apply_to_legs};

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Leg(#[from] LegError),
}

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The journal continues at this position.
    pub next_position: JournalPosition,
    /// Each group's next delta sequence number.
    pub next_seq: BTreeMap<GroupId, DeltaSeq>,
    /// Deltas written again onto the legs.
    pub replayed_deltas: u64,
    pub replayed_blocks: u64,
    /// Why replay stopped before the end of the journal, if it did: a torn
    /// tail, lost unsynced writes, or a gap. Nothing past that point was
    /// ever acknowledged as durable.
    pub dropped_tail: Option<String>,
    /// Segments already replayed; delete them once a new segment exists.
    pub stale_segments: Vec<PathBuf>,
    /// The regions (volume, block / `region_blocks`) the replayed deltas
    /// touched: another site may lack them.
    pub replayed_regions: std::collections::BTreeSet<(VolumeId, u64)>,
    /// Per group, the delta its newest replayed record (in journal order)
    /// names and the epoch it was written under: the epoch of the group's
    /// image, when that delta is its last.
    pub newest_replayed: BTreeMap<GroupId, (DeltaSeq, stretch_core::Epoch)>,
}

impl Recovery {
    /// The epoch of each group's newest delta, for the groups whose newest
    /// delta was replayed (the others' epochs are not in the journal any
    /// more).
    pub fn last_epochs(&self) -> BTreeMap<GroupId, stretch_core::Epoch> {
        self.newest_replayed
            .iter()
            .filter(|(group, (seq, _))| {
                self.next_seq.get(group).map(|next| next.0) == Some(seq.0 + 1)
            })
            .map(|(group, (_, epoch))| (*group, *epoch))
            .collect()
    }
}

/// Replays every whole record of the journal in `dir`, in position order,
/// onto the legs, then syncs the legs. Afterwards each leg is the image
/// after the last whole delta of its group that the journal held (G3), and
/// every delta that was ever synced in the journal is on a synced leg (G4).
///
/// Replay is idempotent (records carry whole block images), so a crash
/// during recovery just means recovering again. `region_blocks` is the
/// engine's region size, in which the replayed regions are named.
pub fn recover<F: FileSystem>(
    fs: &Arc<F>,
    dir: &Path,
    legs: &BTreeMap<VolumeId, Leg<F>>,
    region_blocks: u64,
) -> Result<Recovery, RecoveryError> {
    let segments = find_segments(fs.as_ref(), dir)?;
    let mut recovery = Recovery {
        next_position: JournalPosition(1),
        ..Recovery::default()
    };
    let mut expected: Option<u64> = None;
    let mut touched: std::collections::BTreeSet<VolumeId> = Default::default();
    for segment in &segments {
        recovery.stale_segments.push(segment.path.clone());
        if recovery.dropped_tail.is_some() {
            continue;
        }
        if let Some(expected) = expected
            && segment.first_position != expected
        {
            recovery.dropped_tail = Some(format!(
                "segment {} starts at {} where {expected} was due",
                segment.path.display(),
                segment.first_position
            ));
            continue;
        }
        expected = Some(segment.first_position);
        // The header holds the numbering after every record before the
        // segment (the same as replaying them, if they are still here).
        for (group, seq) in &segment.next_seq {
            recovery.next_seq.insert(*group, *seq);
        }
        let mut stop: Option<String> = None;
        let stopped = read_records::<F, RecoveryError>(fs.as_ref(), segment, |record| {
            if stop.is_some() {
                return Ok(());
            }
            let due = expected.unwrap_or(record.position.0);
            if record.position.0 != due {
                stop = Some(format!(
                    "record at position {} where {due} was due",
                    record.position.0
                ));
                return Ok(());
            }
            // Records of a deleted volume have no leg to land on.
            apply_to_legs(&record.blocks, |volume| {
                let leg = legs.get(&volume)?;
                touched.insert(volume);
                Some(leg)
            })?;
            recovery.replayed_regions.extend(
                record
                    .blocks
                    .iter()
                    .map(|(key, _)| (key.volume, key.block / region_blocks)),
            );
            recovery.replayed_deltas += 1;
            recovery.replayed_blocks += record.blocks.len() as u64;
            // The newest record in journal order numbers the group, not
            // the highest seq: a resync's first chunk renumbers a replica
            // to its owner's line, below deltas of its own (or of an owner
            // a failover replaced) that the journal may still hold. Its
            // record names the newest delta of the group then.
            recovery
                .next_seq
                .insert(record.group, DeltaSeq(record.seq.0 + 1));
            recovery
                .newest_replayed
                .insert(record.group, (record.seq, record.epoch));
            expected = Some(record.position.0 + 1);
            Ok(())
        })?;
        if let Some(reason) = stop.or(stopped) {
            recovery.dropped_tail = Some(format!("{}: {reason}", segment.path.display()));
        }
    }
    for volume in touched {
        legs[&volume].sync()?;
    }
    recovery.next_position = JournalPosition(expected.unwrap_or(1).max(1));
    Ok(recovery)
}
