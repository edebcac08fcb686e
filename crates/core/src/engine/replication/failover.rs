//! Ownership moving without a hand-over: a replica taking a group over
//! when its owner is gone, and what the old owner lost by it.
//!
//! Rules:
//! - the control plane tells every site where each epoch's deltas start
//!   ([`Engine::set_epoch_history`]); a delta seq names one delta only
//!   together with the epoch it was written under;
//! - an owner streams to a resuming site only if the site's newest delta
//!   is on the owner's line (written under the epoch the history names for
//!   its seq); otherwise the site owned the group once and wrote deltas
//!   the cluster lost, and the regions that may differ are copied to it:
//!   the ones it names as written by its lost deltas and the ones the
//!   owner's line wrote since the lines split (every region when either
//!   side does not know);
//! - a replica about to take over stops taking deltas and chunks, so the
//!   seq it reports is the image it will own from;
//! - a site that owned a group and learns another site owns it now fails
//!   the writes still in flight there (they were never acknowledged, and
//!   no longer can be), counts the deltas past the new epoch's start as
//!   lost, and keeps its image until the new owner resyncs it.

use super::*;
use crate::site_message::LOST_REGIONS_MAX;

/// Where one ownership epoch of a group starts: its deltas are the seqs
/// after `after_seq`, up to the next entry's `after_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EpochStart {
    pub epoch: Epoch,
    pub after_seq: DeltaSeq,
    /// The old owner handed the group over (a planned move): it wrote
    /// nothing after `after_seq`, so no site can hold a delta past it
    /// written under the older epoch. False for a failover.
    pub handed_over: bool,
}

/// What a site that lost ownership without handing over still has to
/// count once the new epoch's start is known.
#[derive(Debug)]
pub(super) struct LostOwnership {
    /// The epoch this site owned the group under: its deltas after the
    /// start of the first later epoch are off the line, however many
    /// owners followed before it learned.
    own_epoch: Epoch,
    /// The newest delta closed here.
    last: DeltaSeq,
    /// Bytes of the deltas still retained here when ownership moved.
    retained_bytes: BTreeMap<DeltaSeq, u64>,
}

/// What a site that lost ownership without handing over knows of the
/// regions its deltas wrote that the other sites may lack: sent with its
/// resumes until the new owner's resync replaces them.
#[derive(Debug)]
pub(super) struct LostRegions {
    /// Every region of the deltas retained here when ownership moved and
    /// of the maps of what each other site lacked. A delta in neither was
    /// applied at every site, so it is on every later owner's line.
    regions: BTreeSet<(VolumeId, u64)>,
    /// Deltas up to this seq predate this run here: what they wrote is
    /// not known, so the regions only cover a split after it.
    known_from: DeltaSeq,
}

impl Engine {
    /// Where each ownership epoch of `group` starts, as the ownership
    /// authority recorded it. Replaces what was known; an empty history
    /// turns the epoch checks off for the group.
    pub fn set_epoch_history(&mut self, group: GroupId, mut history: Vec<EpochStart>) {
        history.sort_by_key(|start| start.epoch);
        self.replication.epoch_history.insert(group, history);
        self.count_lost_deltas(group);
    }

    /// The epoch delta `seq` of `group` was written under, by the history;
    /// `None` if the history does not reach back to it. The newest epoch
    /// that starts before `seq`, not the one that starts closest to it: a
    /// takeover from a site that lagged starts an epoch at an older seq
    /// than the epoch before it did, and the line it starts replaces
    /// everything after that seq (epoch 1 after 0, epoch 2 after 6,
    /// epoch 3 after 0: seq 9 is epoch 3's).
    pub(super) fn epoch_at(&self, group: GroupId, seq: DeltaSeq) -> Option<Epoch> {
        self.replication
            .epoch_history
            .get(&group)?
            .iter()
            .filter(|start| start.after_seq < seq)
            .map(|start| start.epoch)
            .max()
    }

    /// True if every epoch of `group`'s history starts before its first
    /// delta (or there is no history: the epoch rules are off): whoever
    /// owns it now wrote every delta of it.
    pub(super) fn owned_since_first_delta(&self, group: GroupId) -> bool {
        self.replication
            .epoch_history
            .get(&group)
            .is_none_or(|history| history.iter().all(|start| start.after_seq == DeltaSeq(0)))
    }

    /// The newest seq a site whose deltas were written under `epoch`
    /// shares with the owner's line of `group`: every later epoch started
    /// at or after it. `None` if no later epoch is recorded.
    pub(super) fn line_split(&self, group: GroupId, epoch: Epoch) -> Option<DeltaSeq> {
        self.replication
            .epoch_history
            .get(&group)?
            .iter()
            .filter(|start| start.epoch > epoch)
            .map(|start| start.after_seq)
            .min()
    }

    /// At a site whose image of `group` diverged: the regions its lost
    /// deltas wrote, if it knows all of them and they fit in a resume.
    pub(super) fn lost_regions_to_send(&mut self, group: GroupId) -> Option<Vec<(VolumeId, u64)>> {
        if !self.diverged_here(group) {
            // Resynced (or never diverged): nothing of its own line is left.
            self.replication.lost_regions.remove(&group);
            return None;
        }
        let epoch = self.groups.get(&group)?.last_epoch?;
        let split = self.line_split(group, epoch)?;
        let lost = self.replication.lost_regions.get(&group)?;
        if split < lost.known_from || lost.regions.len() > LOST_REGIONS_MAX {
            return None;
        }
        if self.config.planted_bug == Some(PlantedBug::HealForgetsLostRegions) {
            return Some(Vec::new());
        }
        Some(lost.regions.iter().copied().collect())
    }

    /// True if a site holding `group`'s deltas up to `have`, the newest
    /// written under `have_epoch`, is not on this owner's line of deltas.
    /// Without a history nothing is diverged (the rule is off). A site that
    /// does not know its epoch is taken as diverged once a failover
    /// happened before `have`: it may have been the owner that wrote past
    /// it. A hand-over cannot leave such deltas behind (the old owner
    /// stopped at the boundary), so it does not count.
    pub(super) fn replica_diverged(
        &self,
        group: GroupId,
        have: DeltaSeq,
        have_epoch: Option<Epoch>,
    ) -> bool {
        let Some(history) = self.replication.epoch_history.get(&group) else {
            return false;
        };
        if have == DeltaSeq(0) {
            return false;
        }
        let Some(written) = self.epoch_at(group, have) else {
            // Before the history starts: it says nothing either way.
            return false;
        };
        match have_epoch {
            Some(epoch) => epoch != written,
            None => history
                .iter()
                .skip(1)
                .any(|start| !start.handed_over && start.after_seq < have),
        }
    }

    /// At a replica of `group`: stops taking its deltas and resync chunks
    /// (they are refused from now on) and returns the newest delta held
    /// whole, the seq the new epoch starts after if this site takes over.
    /// `None` if this site owns the group, does not know it, is mid-resync
    /// (its image is at no delta boundary: it cannot own it), has not
    /// synced its newest deltas of the group in its journal yet (the image
    /// would not survive a crash here; try again once it has), or holds
    /// deltas of an ownership a failover ended (it would bring writes the
    /// cluster dropped back to life, under writes acknowledged since).
    /// [`Engine::set_owner`] naming this site completes the takeover,
    /// [`Engine::cancel_takeover`] calls it off.
    pub fn begin_takeover(&mut self, now: Timestamp, group: GroupId) -> Option<DeltaSeq> {
        self.observe(now);
        let state = self.groups.get(&group)?;
        if state.owner == self.config.site {
            return None;
        }
        if self.mid_resync_here(group) || self.diverged_here(group) {
            return None;
        }
        // The image offered is the one owned from, and the failover counts
        // as lost only what it lacks: it must survive a crash here. Deltas
        // received but not yet synced in this site's journal are held in
        // memory only; a crash after the promotion would take the new
        // owner back before the seq its epoch starts after (writes the
        // failover kept, lost without a report, and new deltas numbered
        // under the seqs of the old owner's). The journal sync already
        // asked for makes them durable; the takeover is tried again then.
        if self.takeover_awaits_journal(group) {
            return None;
        }
        let last = DeltaSeq(state.next_seq.0 - 1);
        self.replication.taking_over.insert(group);
        Some(last)
    }

    /// True at a replica of `group` that received deltas of it its journal
    /// has not synced yet: it holds them in memory only, so it cannot offer
    /// its image for a takeover until the sync (already asked for) is done.
    /// A survivor in this state has not offered yet, rather than offered
    /// nothing: the others wait for it as for any survivor still to offer.
    pub fn takeover_awaits_journal(&self, group: GroupId) -> bool {
        self.groups.get(&group).is_some_and(|state| {
            state.owner != self.config.site && state.last_position > self.journal.synced_upto
        })
    }

    /// Calls off a takeover begun here: the site follows its owner again
    /// and asks it for what was refused meanwhile.
    pub fn cancel_takeover(&mut self, group: GroupId) {
        if !self.replication.taking_over.remove(&group) {
            return;
        }
        let owner = self.owner_of(group);
        if owner != self.config.site && self.replication.connected.contains(&owner) {
            self.send_resume(group);
        }
    }

    /// True at a site that does not own `group` and whose newest delta of
    /// it was written under another epoch than the history names for its
    /// seq: an old owner that kept writing after a failover, or a replica
    /// that took those deltas from it. Its image is on a line the cluster
    /// left, until the owner's resync replaces it.
    pub(crate) fn diverged_here(&self, group: GroupId) -> bool {
        let Some(state) = self.groups.get(&group) else {
            return false;
        };
        if state.owner == self.config.site {
            return false;
        }
        let last = DeltaSeq(state.next_seq.0 - 1);
        self.replica_diverged(group, last, state.last_epoch)
    }

    pub(super) fn is_taking_over(&self, group: GroupId) -> bool {
        self.replication.taking_over.contains(&group)
    }

    /// A delta or chunk of a group this site is taking over: refused, so
    /// the image stays at the seq `begin_takeover` reported.
    pub(super) fn refused_while_taking_over(&self, message: &SiteMessage) -> bool {
        match message {
            SiteMessage::Delta(record) | SiteMessage::Deltas { record, .. } => {
                self.is_taking_over(record.group)
            }
            SiteMessage::Resync { group, .. } => self.is_taking_over(*group),
            _ => false,
        }
    }

    /// This site owned `group` and another site owns it from `epoch` on.
    /// Called before the ownership changes here: the open delta is closed
    /// while still numbered by this site (its writes were acknowledged:
    /// they stay in the local image, which the new owner resyncs), writes
    /// still in flight fail, and what the cluster lost is counted once the
    /// history says where the new epoch starts.
    pub(super) fn lose_ownership(&mut self, group: GroupId, owner: SiteId) {
        self.close_delta(group);
        self.fail_writes_in_flight(group, owner);
        let region_blocks = self.config.region_blocks;
        let lost_regions = self.replication.outbound.get(&group).and_then(|outbound| {
            // A map of every region: what some site lacks is not known.
            if outbound.peers.values().any(|progress| progress.dirty_all) {
                return None;
            }
            let mut regions: BTreeSet<(VolumeId, u64)> = outbound
                .retained
                .iter()
                .flat_map(|retained| regions_of(&retained.record, region_blocks))
                .collect();
            // Regions a resync was copying count too: the deltas it
            // covers may have been retired for it.
            for progress in outbound.peers.values() {
                regions.extend(progress.dirty.iter().copied());
                regions.extend(progress.unacked_regions());
            }
            regions.extend(self.replication.internal.values().filter_map(
                |internal| match internal {
                    Internal::ResyncRead {
                        group: read_group,
                        region,
                        ..
                    } if *read_group == group => Some(*region),
                    _ => None,
                },
            ));
            Some(LostRegions {
                regions,
                known_from: outbound.known_from,
            })
        });
        match lost_regions {
            Some(lost) => self.replication.lost_regions.insert(group, lost),
            None => self.replication.lost_regions.remove(&group),
        };
        let Some(state) = self.groups.get(&group) else {
            return;
        };
        let last = DeltaSeq(state.next_seq.0 - 1);
        // Not the new owner's yet: the epoch it owned the group under.
        let own_epoch = state.epoch;
        let retained_bytes = self
            .replication
            .outbound
            .get(&group)
            .map(|outbound| {
                outbound
                    .retained
                    .iter()
                    .map(|retained| (retained.seq, retained.bytes))
                    .collect()
            })
            .unwrap_or_default();
        self.replication.lost_ownership.insert(
            group,
            LostOwnership {
                own_epoch,
                last,
                retained_bytes,
            },
        );
        self.count_lost_deltas(group);
    }

    /// Writes (and flushes) of `group` not acknowledged yet can no longer
    /// be: another site owns the group, and what they wrote here is not on
    /// its line. They fail; the client retries at the new owner.
    fn fail_writes_in_flight(&mut self, group: GroupId, owner: SiteId) {
        let volumes = self.volumes_of(group);
        let reason = format!(
            "ownership of group {group} moved to site {owner} before the request was acknowledged"
        );
        let mut waiting = Vec::new();
        for (request, pending) in &mut self.pending {
            if !volumes.contains(&pending.volume()) {
                continue;
            }
            match pending {
                // Answered (with this error) once its leg reads are back.
                Pending::Write { failed, .. } => *failed = Some(reason.clone()),
                Pending::Durable { .. } => waiting.push(*request),
                Pending::Read(_) => {}
            }
        }
        for request in waiting {
            self.pending.remove(&request);
            self.reply(request, Err(RequestError::Io(reason.clone())));
        }
        let (moved, kept): (VecDeque<WriteRequest>, VecDeque<WriteRequest>) =
            std::mem::take(&mut self.throttled)
                .into_iter()
                .partition(|write| volumes.contains(&write.volume));
        self.throttled = kept;
        for write in moved {
            self.reply(write.request, Err(RequestError::Io(reason.clone())));
        }
    }

    /// Counts the deltas this site acknowledged as owner that the next
    /// owner's epoch starts before: S+1..=last are lost to the cluster
    /// (S is where the first epoch after this site's starts, whichever
    /// epoch the site learns first: owners may have followed one another
    /// while it was away).
    /// Bytes are known only for deltas still retained here when ownership
    /// moved (those every site had applied were retired, and a site that
    /// applied them could not have taken over before them).
    fn count_lost_deltas(&mut self, group: GroupId) {
        let Some(lost) = self.replication.lost_ownership.get(&group) else {
            return;
        };
        let Some(after) = self.line_split(group, lost.own_epoch) else {
            // Not known yet: counted when the history arrives.
            return;
        };
        let lost = self
            .replication
            .lost_ownership
            .remove(&group)
            .expect("engine invariant: looked up above");
        if after >= lost.last {
            return;
        }
        self.stats.failover_lost_deltas_total += lost.last.0 - after.0;
        self.stats.failover_lost_bytes_total += lost
            .retained_bytes
            .range(DeltaSeq(after.0 + 1)..)
            .map(|(_, bytes)| bytes)
            .sum::<u64>();
    }
}
