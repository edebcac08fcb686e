//! The owner's side of replication: closing and shipping deltas,
//! retiring them once every site applied them, folding an absent site's
//! backlog into regions, answering resumes, resyncing a site region by
//! region, and serving other sites' strict reads and forwarded requests.

use super::*;

impl Engine {
    pub(super) fn peer_progress(
        &mut self,
        group: GroupId,
        peer: SiteId,
    ) -> Option<&mut PeerProgress> {
        let found = self.replication.progress_mut(group, peer);
        if found.is_none() {
            self.stats.refused_messages_total += 1;
        }
        found
    }

    pub(in crate::engine) fn backlog_full(&self) -> bool {
        self.replication.backlog_bytes > self.config.backlog_bytes_max
    }

    /// Keeps a just-closed delta for the other sites (shipped once the
    /// local journal holds it).
    pub(in crate::engine) fn retain_for_peers(&mut self, record: &DeltaRecord) {
        let now = self.now;
        let Some(outbound) = self.replication.outbound.get_mut(&record.group) else {
            return;
        };
        if outbound.peers.is_empty() {
            return;
        }
        for progress in outbound.peers.values_mut() {
            if progress.state == PeerState::NeedsResync {
                progress
                    .dirty
                    .extend(regions_of(record, self.config.region_blocks));
            }
        }
        for (key, image) in &record.blocks {
            outbound.history.insert(*key, (record.seq, image.clone()));
        }
        let bytes = record.data_bytes();
        outbound.closed_bytes += bytes;
        outbound.retained.push_back(Retained {
            seq: record.seq,
            position: record.position.0,
            record: record.clone(),
            bytes,
            closed_at: now,
        });
        self.replication.backlog_bytes += bytes;
        self.replication.backlog_deltas += 1;
        if self.backlog_full() {
            self.fold_absent_peers();
        }
        self.retire_shipped();
    }

    /// Past the backlog bound, a site that is not connected no longer holds
    /// deltas back: what it misses becomes regions to resync.
    pub(super) fn fold_absent_peers(&mut self) {
        for outbound in self.replication.outbound.values_mut() {
            for progress in outbound.peers.values_mut() {
                if progress.state != PeerState::Waiting {
                    continue;
                }
                fold(
                    progress,
                    &outbound.retained,
                    outbound.known_from,
                    self.config.region_blocks,
                );
                self.stats.backlog_folds_total += 1;
                self.marks.hit(Mark::FoldAbsent);
            }
        }
    }

    /// Writes have waited on a full backlog for `backlog_wait_ms_max`:
    /// every site holding it back stops being kept deltas for, whether it
    /// is connected (a link slower than the writes) or not (a cut not yet
    /// noticed). What it lacks becomes regions, copied when it resumes; a
    /// connected one is told to resume now.
    pub(in crate::engine) fn check_backlog_wait(&mut self, now: Timestamp) {
        let Some(since) = self.replication.backlog_wait_since else {
            return;
        };
        if !self.backlog_full() || self.throttled.is_empty() {
            self.replication.backlog_wait_since = None;
            return;
        }
        if now < since.saturating_add_millis(self.config.backlog_wait_ms_max) {
            return;
        }
        self.replication.backlog_wait_since = None;
        if self.config.planted_bug == Some(PlantedBug::StallOnFullBacklog) {
            return;
        }
        self.fold_lagging_peers();
        self.retire_shipped();
    }

    pub(super) fn fold_lagging_peers(&mut self) {
        let mut folded = Vec::new();
        let mut resyncing = Vec::new();
        for (group, outbound) in &mut self.replication.outbound {
            for (peer, progress) in &mut outbound.peers {
                let lagging = outbound
                    .retained
                    .iter()
                    .any(|retained| progress.holds(retained.seq));
                if !lagging {
                    continue;
                }
                match progress.state {
                    PeerState::Waiting | PeerState::Streaming => {
                        let was_streaming = progress.state == PeerState::Streaming;
                        fold(
                            progress,
                            &outbound.retained,
                            outbound.known_from,
                            self.config.region_blocks,
                        );
                        self.stats.backlog_folds_total += 1;
                        self.marks.hit(Mark::FoldLagging);
                        if was_streaming {
                            folded.push((*group, *peer));
                        }
                    }
                    PeerState::Resyncing => resyncing.push((*group, *peer)),
                    PeerState::NeedsResync => {}
                }
            }
        }
        for (group, peer) in resyncing {
            self.abandon_resync(group, peer);
            self.stats.backlog_folds_total += 1;
            self.marks.hit(Mark::FoldLagging);
            folded.push((group, peer));
        }
        for (group, peer) in folded {
            if self.replication.connected.contains(&peer) {
                self.actions.push_back(Action::Send {
                    peer,
                    message: SiteMessage::Rejoin { group },
                });
            }
        }
    }

    /// Before journal records up to `upto` are released: brings each other
    /// site's saved map up to date and returns how many saves were asked
    /// for. The map is recomputed each time: the regions of released
    /// deltas the site has not journaled (kept until it does), the regions
    /// still to resync and those being read for it. Unreleased records are
    /// not needed in it: recovery replays them and names their regions.
    pub(in crate::engine) fn save_dirty_maps(&mut self, upto: u64) -> usize {
        let mut saves = 0;
        let peers = self.config.peers.clone();
        for peer in peers {
            let mut regions: BTreeSet<(VolumeId, u64)> = BTreeSet::new();
            for (group, outbound) in &self.replication.outbound {
                let Some(progress) = outbound.peers.get(&peer) else {
                    continue;
                };
                // What it lacks of the deltas before this site's run as
                // owner (it took the group over, or restarted) is not
                // known here, unless a map restored at start says: such a
                // site may lack any region, and the map must say so, or a
                // restart here would trust it and resync only a part.
                let unknown = progress.journaled < outbound.known_from && !progress.restored;
                if progress.dirty_all || unknown {
                    regions.extend(self.every_region_of(*group));
                }
                // The map speaks for this group: a group it does not name
                // was not owned here when it was saved, and what the site
                // lacks of it is unknown after a restart.
                regions.insert((RESERVED_VOLUME, u64::from(group.0)));
                if self.config.planted_bug != Some(PlantedBug::MapForgetsDirty) {
                    regions.extend(progress.dirty.iter().copied());
                }
                regions.extend(progress.unacked_regions());
                for retained in outbound
                    .retained
                    .iter()
                    .filter(|r| r.position <= upto && r.seq > progress.journaled)
                {
                    regions.extend(regions_of(&retained.record, self.config.region_blocks));
                }
            }
            for internal in self.replication.internal.values() {
                if let Internal::ResyncRead {
                    peer: reading,
                    region,
                    ..
                } = internal
                    && *reading == peer
                {
                    regions.insert(*region);
                }
            }
            let entry = self.replication.durable_maps.entry(peer).or_default();
            let new = regions;
            if entry.1 && new == entry.0 {
                continue;
            }
            *entry = (new.clone(), true);
            let io = self.new_io(IoPurpose::MapSave);
            self.actions.push_back(Action::SaveDirtyMap {
                io,
                peer,
                regions: new.into_iter().collect(),
            });
            saves += 1;
            self.marks.hit(Mark::DirtyMapSaved);
        }
        saves
    }

    /// Drops deltas every site applied (or will get by resync).
    pub(in crate::engine) fn retire_shipped(&mut self) {
        let mut freed = false;
        for outbound in self.replication.outbound.values_mut() {
            while let Some(front) = outbound.retained.front() {
                if outbound.peers.values().any(|peer| peer.holds(front.seq)) {
                    break;
                }
                let retained = outbound
                    .retained
                    .pop_front()
                    .expect("engine invariant: front exists");
                for (key, _) in &retained.record.blocks {
                    if outbound
                        .history
                        .get(key)
                        .is_some_and(|(seq, _)| *seq == retained.seq)
                    {
                        outbound.history.remove(key);
                    }
                }
                outbound.retired_upto = retained.seq;
                self.replication.backlog_bytes -= retained.bytes;
                self.replication.backlog_deltas -= 1;
                freed = true;
            }
        }
        if freed {
            self.admit_throttled();
        }
    }

    /// After a journal sync: ship what became durable to streaming sites;
    /// at a replica, acknowledge what became durable.
    pub(in crate::engine) fn after_journal_sync(&mut self) {
        let owned: Vec<GroupId> = self.replication.outbound.keys().copied().collect();
        for group in owned {
            let peers: Vec<SiteId> = self.replication.outbound[&group]
                .peers
                .keys()
                .copied()
                .collect();
            for peer in peers {
                // Chunks first: deltas closed after a chunk was built must
                // not overtake it.
                self.release_chunks(group, peer);
                self.ship_ready(group, peer);
            }
        }
        let replicated: Vec<GroupId> = self.replication.inbound.keys().copied().collect();
        for group in replicated {
            self.send_replica_acks(group);
        }
    }

    /// Sends a site the retained deltas after what it was shipped that the
    /// local journal holds durably, while the bytes it has not journaled
    /// yet stay within `ship_window_bytes_max`. Deltas ready together (the
    /// site resumed, or was behind while the window was full) leave merged,
    /// one epoch per record and each record's blocks within
    /// [`MERGED_RECORD_BYTES_MAX`] (a lone delta goes as it is): a
    /// block rewritten in several of them crosses the link once. What
    /// waits for the window stays in the backlog, bounded by
    /// `backlog_bytes_max`, not in the link's send buffers. The window
    /// counts the deltas' own bytes, which a merged record may carry in
    /// fewer.
    pub(super) fn ship_ready(&mut self, group: GroupId, peer: SiteId) {
        let synced = self.journal.synced_upto;
        let now = self.now;
        let (window_min, window_max) = (
            self.config.ship_window_bytes_min,
            self.config.ship_window_bytes_max,
        );
        let Some(outbound) = self.replication.outbound.get_mut(&group) else {
            return;
        };
        let Some(progress) = outbound.peers.get_mut(&peer) else {
            return;
        };
        if !matches!(progress.state, PeerState::Streaming | PeerState::Resyncing) {
            return;
        }
        // Deltas after a resync's base follow its first chunk, and none
        // overtakes a chunk held until the journal holds what it shows:
        // the site would lay the chunk's older images over the delta's, or
        // (holding deltas a failover discarded, numbered past the base)
        // take it for one of its own and drop it.
        let chunk_pending = progress.state == PeerState::Resyncing && !progress.chunk_built;
        if chunk_pending || !progress.held_chunks.is_empty() {
            return;
        }
        // No window while the site resyncs: it is consistent only once it
        // holds every delta up to the point the resync's last chunk names,
        // and a site whose own deltas diverged acknowledges none before
        // then: deltas held back for its acknowledgements may never come
        // (the simulator found such a stall). The backlog bounds them.
        let (window, mut in_flight) = if progress.state == PeerState::Resyncing {
            (u64::MAX, 0)
        } else {
            let in_flight: u64 = outbound
                .retained
                .iter()
                .filter(|retained| {
                    retained.seq > progress.journaled && retained.seq <= progress.shipped
                })
                .map(|retained| retained.bytes)
                .sum();
            (
                progress.window.bytes(now, window_min, window_max),
                in_flight,
            )
        };
        let ready: Vec<&Retained> = outbound
            .retained
            .iter()
            .filter(|retained| retained.seq > progress.shipped)
            .take_while(|retained| retained.position <= synced)
            .collect();
        let mut messages = Vec::new();
        let mut next = 0;
        while next < ready.len() && in_flight < window {
            let first = ready[next];
            // Built only once a second delta joins: a site that keeps up
            // gets each delta as it is. A record may take the window past
            // its bound by up to its own size (capping it at the window
            // would leave a small window merging nothing).
            let mut blocks: Option<BTreeMap<BlockKey, BlockImage>> = None;
            let mut end = next + 1;
            while end < ready.len() && ready[end].record.epoch == first.record.epoch {
                let merged =
                    blocks.get_or_insert_with(|| first.record.blocks.iter().cloned().collect());
                let record = &ready[end].record;
                let added = record
                    .blocks
                    .iter()
                    .filter(|(key, _)| !merged.contains_key(key))
                    .count();
                if (merged.len() + added) as u64 * BLOCK_SIZE as u64 > MERGED_RECORD_BYTES_MAX {
                    break;
                }
                // Oldest first: a later delta's image of a block wins.
                for (key, image) in &record.blocks {
                    merged.insert(*key, image.clone());
                }
                end += 1;
            }
            let shipped = &ready[next..end];
            next = end;
            let bytes: u64 = shipped.iter().map(|retained| retained.bytes).sum();
            in_flight += bytes;
            let last = shipped[shipped.len() - 1];
            progress.shipped = last.seq;
            if progress.state == PeerState::Streaming {
                progress.window.shipped(last.seq, bytes, now);
            }
            self.stats.shipped_deltas_total += shipped.len() as u64;
            let (Some(blocks), true) = (blocks, shipped.len() > 1) else {
                self.stats.shipped_bytes_total += last.bytes;
                messages.push(SiteMessage::Delta(last.record.clone()));
                continue;
            };
            let record = DeltaRecord {
                position: last.record.position,
                group: last.record.group,
                epoch: last.record.epoch,
                seq: last.seq,
                blocks: blocks.into_iter().collect(),
            };
            self.stats.shipped_bytes_total += record.data_bytes();
            self.stats.merged_deltas_total += shipped.len() as u64;
            messages.push(SiteMessage::Deltas {
                first: first.seq,
                record,
            });
        }
        if next < ready.len() && window < window_max {
            self.marks.hit(Mark::MeasuredWindowHeldDeltas);
        }
        for message in messages {
            self.actions.push_back(Action::Send { peer, message });
        }
    }

    /// How many resync regions a volume of `size` bytes has.
    fn region_count(&self, size: u64) -> u64 {
        (size / BLOCK_SIZE as u64).div_ceil(self.config.region_blocks)
    }

    /// Every region of `group`'s volumes.
    pub(super) fn every_region_of(&self, group: GroupId) -> Vec<(VolumeId, u64)> {
        self.volumes
            .iter()
            .filter(|(_, state)| state.spec.group == group)
            .flat_map(|(volume, state)| {
                (0..self.region_count(state.spec.size)).map(move |region| (*volume, region))
            })
            .collect()
    }

    /// The regions of a resume's list that name regions of `group`'s
    /// volumes: the list came from another site.
    fn regions_of_group(
        &self,
        group: GroupId,
        regions: Vec<(VolumeId, u64)>,
    ) -> BTreeSet<(VolumeId, u64)> {
        regions
            .into_iter()
            .filter(|(volume, region)| {
                self.volumes.get(volume).is_some_and(|state| {
                    state.spec.group == group && *region < self.region_count(state.spec.size)
                })
            })
            .collect()
    }

    pub(super) fn receive_resume(
        &mut self,
        from: SiteId,
        group: GroupId,
        have: Option<DeltaSeq>,
        have_epoch: Option<Epoch>,
        lost_regions: Option<Vec<(VolumeId, u64)>>,
        resume: u64,
    ) {
        // A group this site has not heard of yet reads as its own (see
        // `owner_of`): refused like any other resume it cannot serve. The
        // replica resumes again when this site takes the group (below, in
        // `set_owner`).
        let Some(state) = self.groups.get(&group) else {
            self.stats.refused_messages_total += 1;
            return;
        };
        if state.owner != self.config.site {
            self.stats.refused_messages_total += 1;
            return;
        }
        let last = DeltaSeq(state.next_seq.0 - 1);
        let diverged =
            have.is_some_and(|have| have <= last && self.replica_diverged(group, have, have_epoch));
        // Where the site's line left this one and the regions its own line
        // wrote since, if it says: only those and this line's since differ.
        let split_and_lost = match (diverged, have_epoch, lost_regions) {
            (true, Some(epoch), Some(regions)) => self
                .line_split(group, epoch)
                .map(|split| (split, self.regions_of_group(group, regions))),
            _ => None,
        };
        let Some(outbound) = self.replication.outbound.get_mut(&group) else {
            self.stats.refused_messages_total += 1;
            return;
        };
        let retired_upto = outbound.retired_upto;
        let Some(progress) = outbound.peers.get_mut(&from) else {
            self.stats.refused_messages_total += 1;
            return;
        };
        // A resume while resyncing means the connection was reset before we
        // noticed: chunks in flight may be lost.
        if progress.state == PeerState::Resyncing {
            self.abandon_resync(group, from);
        }
        let Some(outbound) = self.replication.outbound.get_mut(&group) else {
            return;
        };
        let Some(progress) = outbound.peers.get_mut(&from) else {
            return;
        };
        progress.resume = resume;
        let restored = std::mem::take(&mut progress.restored);
        // A site holding every delta needs nothing else, whatever the maps
        // say (they may predate what it received since).
        if have == Some(last) && !diverged {
            progress.dirty.clear();
            progress.dirty_all = false;
        }
        if let Some(have) = have
            && !diverged
            && (progress.state != PeerState::NeedsResync || have == last)
            && have >= retired_upto
            && have <= last
        {
            progress.state = PeerState::Streaming;
            progress.shipped = have;
            progress.window.forget_in_flight();
            if have < last {
                self.marks.hit(Mark::CatchUpFromRetained);
            }
            self.ship_ready(group, from);
            // It counts for flush-sync and sync again: what it journaled
            // may already cover requests waiting for another site.
            self.answer_synced_waiters();
            // A resync of this group abandoned above freed window slots
            // other groups' resyncs to the site may be waiting for.
            self.pump_peer(from);
            return;
        }
        // The deltas it lacks are not all here: copy the regions instead.
        // A site marked for resync had every delta it missed recorded as
        // dirty regions; otherwise what it lacks is unknown here.
        let tracked = progress.state == PeerState::NeedsResync;
        let resynced_here = progress.resynced_here;
        match have {
            // Its deltas after the point where the lines split are not
            // the owner's: nothing here says which regions they touched.
            _ if diverged => match split_and_lost {
                // This line since the split is known here (retained, or in
                // the map of what the site lacks): its regions and the
                // site's own.
                Some((split, lost)) if outbound.known_from <= split && !progress.dirty_all => {
                    self.marks.hit(Mark::DivergedRegionResync);
                    progress.dirty.extend(lost);
                    for retained in outbound.retained.iter().filter(|r| r.seq > split) {
                        progress
                            .dirty
                            .extend(regions_of(&retained.record, self.config.region_blocks));
                    }
                }
                _ => {
                    self.marks.hit(Mark::DivergedReplicaResync);
                    progress.dirty_all = true;
                }
            },
            Some(have) if have > last => progress.dirty_all = true,
            Some(have) if have < retired_upto && !tracked => progress.dirty_all = true,
            // Only a site marked for resync gets here (an unmarked one with
            // `have` in range streams, above), and its map already names
            // these regions: the fold added every retained delta it had
            // not journaled, and each delta closed since was added as it
            // closed. Named again as a second line of defence (mutation
            // testing shows the swarm cannot tell the difference).
            Some(have) => {
                for retained in outbound.retained.iter().filter(|r| r.seq > have) {
                    progress
                        .dirty
                        .extend(regions_of(&retained.record, self.config.region_blocks));
                }
            }
            // Mid-resync, and nothing here says what it lacks (this site
            // restarted without a saved map, the site recovered from a
            // crash mid-resync, or it is mid-way through another owner's
            // resync): every region. (`!tracked` alone adds nothing the
            // other two miss in any state reached so far: a site that
            // resumes mid-resync while its progress here is not marked
            // for resync finished one of this site's resyncs, so what it
            // lacks is in the retained deltas. It stays as the safe
            // answer should that change; mutation testing cannot tell it
            // apart.)
            None if !tracked || restored || !resynced_here => {
                if restored {
                    self.marks.hit(Mark::RestoredMidResync);
                }
                progress.dirty_all = true;
            }
            None => {
                let floor = progress.applied;
                for retained in outbound.retained.iter().filter(|r| r.seq > floor) {
                    progress
                        .dirty
                        .extend(regions_of(&retained.record, self.config.region_blocks));
                }
            }
        }
        progress.state = PeerState::Resyncing;
        progress.resynced_here = true;
        progress.chunk_built = false;
        self.marks.hit(Mark::ResyncStarted);
        progress.shipped = last;
        progress.window.forget_in_flight();
        progress.resync_base = last;
        if std::mem::take(&mut progress.dirty_all) {
            let regions = self.every_region_of(group);
            let progress = self
                .peer_progress(group, from)
                .expect("engine invariant: progress looked up above");
            progress.dirty.extend(regions);
        }
        self.pump_peer(from);
        self.retire_shipped();
    }

    /// The resync of `group` to `peer` stops (the connection dropped, or
    /// the site asked to resume anew). Whatever it had not finished is
    /// dirty again at once: the regions being read (a new resync may start
    /// and finish before those reads come back), held or sent but not
    /// acknowledged, and the regions of deltas shipped after its base that
    /// the site has not applied (they may be lost with the connection, and
    /// stop being kept for it now).
    pub(super) fn abandon_resync(&mut self, group: GroupId, peer: SiteId) {
        let Some(generation) = self
            .replication
            .outbound
            .get(&group)
            .and_then(|outbound| outbound.peers.get(&peer))
            .map(|progress| progress.resync_generation)
        else {
            return;
        };
        self.marks.hit(Mark::ResyncAbandoned);
        let reading: Vec<(VolumeId, u64)> = self
            .replication
            .internal
            .values()
            .filter_map(|internal| match internal {
                Internal::ResyncRead {
                    peer: reader,
                    group: read_group,
                    region,
                    generation: read_generation,
                    ..
                } if *reader == peer && *read_group == group && *read_generation == generation => {
                    Some(*region)
                }
                _ => None,
            })
            .collect();
        let Some(outbound) = self.replication.outbound.get_mut(&group) else {
            return;
        };
        let Some(progress) = outbound.peers.get_mut(&peer) else {
            return;
        };
        let floor = progress.applied.max(progress.resync_base);
        for retained in outbound.retained.iter().filter(|r| r.seq > floor) {
            progress
                .dirty
                .extend(regions_of(&retained.record, self.config.region_blocks));
        }
        progress.state = PeerState::NeedsResync;
        progress.resync_generation += 1;
        progress.resync_reading = 0;
        progress.last_chunk_sent = false;
        progress.chunk_built = false;
        progress.held_chunks.clear();
        let unacked: Vec<(VolumeId, u64)> = progress.unacked_regions().collect();
        progress.resync_unacked.clear();
        if self.config.planted_bug != Some(PlantedBug::AbandonForgetsUnacked) {
            progress.dirty.extend(unacked);
        }
        progress.dirty.extend(reading);
    }

    /// Keeps up to `resync_chunks_in_flight_max` region reads and chunks
    /// going; sends the last (possibly empty) chunk when nothing is left.
    pub(super) fn pump_resync(&mut self, group: GroupId, peer: SiteId) {
        loop {
            let Some(progress) = self.replication.progress_mut(group, peer) else {
                return;
            };
            if progress.state != PeerState::Resyncing {
                return;
            }
            if progress.dirty.is_empty() {
                if progress.resync_in_flight() == 0 {
                    self.finish_resync(group, peer);
                }
                return;
            }
            if self.resync_in_flight(peer) >= self.config.resync_chunks_in_flight_max {
                return;
            }
            let Some(progress) = self.replication.progress_mut(group, peer) else {
                return;
            };
            let region = progress
                .dirty
                .pop_first()
                .expect("engine invariant: dirty is not empty");
            if self.fast_drain_source_holds(group, peer, region) {
                // Not copied here yet: `peer`, the drain's source, holds
                // the newest image of it.
                continue;
            }
            let Some(progress) = self.replication.progress_mut(group, peer) else {
                return;
            };
            progress.resync_reading += 1;
            let generation = progress.resync_generation;
            self.start_resync_read(group, peer, region, generation);
        }
    }

    /// Region reads and chunks not yet on `peer`'s legs, all groups.
    pub(super) fn resync_in_flight(&self, peer: SiteId) -> usize {
        self.replication
            .outbound
            .values()
            .filter_map(|outbound| outbound.peers.get(&peer))
            .map(PeerProgress::resync_in_flight)
            .sum()
    }

    /// Lets every group resyncing to `peer` use the window's free slots.
    pub(super) fn pump_peer(&mut self, peer: SiteId) {
        let groups: Vec<GroupId> = self
            .replication
            .outbound
            .iter()
            .filter(|(_, outbound)| {
                outbound
                    .peers
                    .get(&peer)
                    .is_some_and(|progress| progress.state == PeerState::Resyncing)
            })
            .map(|(group, _)| *group)
            .collect();
        for group in groups {
            self.pump_resync(group, peer);
        }
    }

    pub(super) fn start_resync_read(
        &mut self,
        group: GroupId,
        peer: SiteId,
        region: (VolumeId, u64),
        generation: u64,
    ) {
        let (volume, index) = region;
        let request = self.new_internal(Internal::ResyncRead {
            peer,
            group,
            region,
            generation,
            stale: false,
        });
        let Some(spec) = self.volume(volume) else {
            // A deleted volume has nothing left to copy.
            self.reply(request, Ok(Response::Data(Bytes::new())));
            return;
        };
        let region_bytes = self.config.region_blocks * BLOCK_SIZE as u64;
        let offset = index * region_bytes;
        let length = region_bytes.min(spec.size.saturating_sub(offset));
        self.start_read(request, volume, offset, length, None);
    }

    /// A leg write landed: resync reads of regions it touched may have read
    /// a mix of old and new blocks, so they are read again.
    pub(in crate::engine) fn mark_resync_reads_stale(&mut self, blocks: &[(BlockKey, BlockImage)]) {
        let region_blocks = self.config.region_blocks;
        for internal in self.replication.internal.values_mut() {
            if let Internal::ResyncRead { region, stale, .. } = internal
                && !*stale
                && blocks
                    .iter()
                    .any(|(key, _)| region_of(key, region_blocks) == *region)
            {
                *stale = true;
            }
        }
    }

    pub(super) fn resync_read_done(
        &mut self,
        peer: SiteId,
        group: GroupId,
        region: (VolumeId, u64),
        generation: u64,
        stale: bool,
        result: Result<Response, RequestError>,
    ) {
        let Some(progress) = self.replication.progress_mut(group, peer) else {
            return;
        };
        if progress.resync_generation != generation {
            // The resync was abandoned meanwhile; the region went back to
            // dirty then.
            return;
        }
        if stale || result.is_err() {
            self.marks.hit(Mark::ResyncReadStale);
            // Read again (an error retries: the region must still be copied).
            let generation = progress.resync_generation;
            self.start_resync_read(group, peer, region, generation);
            return;
        }
        progress.resync_reading -= 1;
        let Ok(Response::Data(data)) = result else {
            panic!("engine invariant: a resync read answers with data");
        };
        let (volume, index) = region;
        let mut blocks = Vec::with_capacity(data.len() / BLOCK_SIZE);
        for (number, chunk) in data.chunks(BLOCK_SIZE).enumerate() {
            let key = BlockKey {
                volume,
                block: index * self.config.region_blocks + number as u64,
            };
            // The cache holds the newest image of resident blocks, newer
            // than what the leg read returned if a write landed meanwhile.
            let image = match self.index.get(&key) {
                Some(entry) => entry.image.clone(),
                // Or-ing every byte (no early exit) lets the compiler use
                // vector instructions: the resync reads every block.
                None if chunk.iter().fold(0, |any, byte| any | byte) == 0 => BlockImage::Zero,
                None => BlockImage::Data(data.slice_ref(chunk)),
            };
            blocks.push((key, image));
        }
        let progress = self
            .peer_progress(group, peer)
            .expect("engine invariant: progress looked up above");
        progress.resync_unacked.push_back(region);
        let last = progress.dirty.is_empty() && progress.resync_reading == 0;
        let base = progress.resync_base;
        self.send_chunk(group, peer, blocks, last, base);
        self.pump_resync(group, peer);
    }

    pub(super) fn send_chunk(
        &mut self,
        group: GroupId,
        peer: SiteId,
        blocks: Vec<(BlockKey, BlockImage)>,
        last: bool,
        base: DeltaSeq,
    ) {
        // A chunk shows the cache's newest images, perhaps some of the open
        // delta, and names deltas up to `base` and `consistent_at`. Like a
        // delta, it leaves only once the local journal holds all of that
        // durably: a crash here must never take back what another site got
        // (it would hold writes this site lost, numbered as deltas this
        // site then numbers differently, and refuse those as duplicates).
        let open_shown = {
            let open = &self.groups[&group].open.blocks;
            blocks.iter().any(|(key, _)| open.contains_key(key))
        };
        if last || open_shown {
            // Whatever the chunks observed is in deltas up to this one.
            self.close_delta(group);
        }
        let needed = self.groups[&group].last_position;
        let consistent_at = DeltaSeq(self.groups[&group].next_seq.0 - 1);
        let consistent_epoch = self.groups[&group]
            .last_epoch
            .or_else(|| self.epoch_at(group, consistent_at));
        self.stats.shipped_bytes_total += blocks.len() as u64 * BLOCK_SIZE as u64;
        let synced = self.journal.synced_upto;
        let Some(progress) = self.replication.progress_mut(group, peer) else {
            return;
        };
        let message = SiteMessage::Resync {
            group,
            blocks,
            last,
            base,
            consistent_at,
            consistent_epoch,
            resume: progress.resume,
        };
        progress.last_chunk_sent = last;
        let first = !std::mem::replace(&mut progress.chunk_built, true);
        if needed <= synced && progress.held_chunks.is_empty() {
            self.actions.push_back(Action::Send { peer, message });
            if first {
                // Deltas that waited for it follow it now.
                self.ship_ready(group, peer);
            }
        } else {
            progress.held_chunks.push_back((needed, message));
            self.marks.hit(Mark::ResyncChunkHeld);
        }
    }

    /// Sends the held chunks the local journal now covers, in order.
    pub(super) fn release_chunks(&mut self, group: GroupId, peer: SiteId) {
        let synced = self.journal.synced_upto;
        let Some(progress) = self.replication.progress_mut(group, peer) else {
            return;
        };
        while progress
            .held_chunks
            .front()
            .is_some_and(|(needed, _)| *needed <= synced)
        {
            let (_, message) = progress
                .held_chunks
                .pop_front()
                .expect("engine invariant: front exists");
            self.actions.push_back(Action::Send { peer, message });
        }
    }

    pub(super) fn finish_resync(&mut self, group: GroupId, peer: SiteId) {
        let Some(progress) = self.peer_progress(group, peer) else {
            return;
        };
        if !progress.last_chunk_sent {
            // Nothing (more) to copy: the site still needs to hear the end.
            progress.resync_unacked.push_back(NO_REGION);
            let base = progress.resync_base;
            self.send_chunk(group, peer, Vec::new(), true, base);
            return;
        }
        progress.state = PeerState::Streaming;
        progress.last_chunk_sent = false;
        // Every chunk is on its legs (chunks are acknowledged once applied):
        // it holds every delta up to the resync's base.
        progress.applied = progress.applied.max(progress.resync_base);
        progress.journaled = progress.journaled.max(progress.resync_base);
        self.marks.hit(Mark::ResyncFinished);
        self.ship_ready(group, peer);
        self.retire_shipped();
        // Every chunk is in its journal now: what it journaled counts.
        self.answer_synced_waiters();
    }

    pub(super) fn receive_resync_ack(&mut self, from: SiteId, group: GroupId, resume: u64) {
        let Some(progress) = self.peer_progress(group, from) else {
            return;
        };
        // An ack for a chunk of an earlier resync: that resync was
        // abandoned, its regions are copied again.
        if progress.state != PeerState::Resyncing || progress.resume != resume {
            self.stats.refused_messages_total += 1;
            return;
        }
        let Some(region) = progress.resync_unacked.pop_front() else {
            self.stats.refused_messages_total += 1;
            return;
        };
        if region != NO_REGION {
            self.stats.resync_regions_done_total += 1;
        }
        self.pump_peer(from);
    }

    pub(super) fn receive_read_request(
        &mut self,
        from: SiteId,
        id: u64,
        request: Request,
        have: Option<DeltaSeq>,
    ) {
        let Request::Read {
            volume,
            offset,
            length,
        } = request
        else {
            self.stats.refused_messages_total += 1;
            return;
        };
        let answer = |engine: &mut Engine, result| {
            engine.actions.push_back(Action::Send {
                peer: from,
                message: SiteMessage::ReadReply { id, result },
            });
        };
        let Some(spec) = self.volume(volume) else {
            answer(self, Err(RequestError::NoVolume(volume)));
            return;
        };
        if let Err(error) = check_range(&spec, offset, length) {
            answer(self, Err(error));
            return;
        }
        if self.serves_fast_drain(spec.group, from) {
            // A fast migration's target copying a region: epoch e's image
            // here, which its seal froze, needs no lease.
            self.count_fast_drain_served(spec.group);
            self.read_whole_range(from, id, volume, offset, length);
            return;
        }
        if self.fast_drain_holds_read(
            from,
            spec.group,
            &SiteMessage::ReadRequest {
                id,
                request: request.clone(),
                have,
            },
        ) {
            return;
        }
        if self.owner_of(spec.group) != self.config.site {
            if self.await_ownership(
                spec.group,
                from,
                SiteMessage::ReadRequest { id, request, have },
            ) {
                return;
            }
            let error = RequestError::Io(format!(
                "site {} does not own volume {volume}",
                self.config.site
            ));
            answer(self, Err(error));
            return;
        }
        // A strict read promises the newest acknowledged writes: without
        // its lease this site may no longer be the one acknowledging them.
        if !self.lease_valid() {
            let error = RequestError::Io(format!(
                "site {} holds no ownership lease for volume {volume}",
                self.config.site
            ));
            answer(self, Err(error));
            return;
        }
        self.count_request_from(spec.group, from);
        if length == 0 {
            answer(self, Ok(Vec::new()));
            return;
        }
        let last = DeltaSeq(self.groups[&spec.group].next_seq.0 - 1);
        let outbound = self.replication.outbound.get(&spec.group);
        let retired_upto = outbound.map_or(last, |outbound| outbound.retired_upto);
        if let Some(have) = have
            && have >= retired_upto
            && have <= last
        {
            // Every delta after `have` is retained or still in the cache.
            let have = if self.config.planted_bug == Some(PlantedBug::DiffSkipsFirstMissing) {
                DeltaSeq(have.0 + 1)
            } else {
                have
            };
            let mut blocks = Vec::new();
            let (mut from_cache, mut from_history) = (false, false);
            for block in block_span(offset, length) {
                let key = BlockKey { volume, block };
                let entry = self.index.get(&key);
                let in_cache = entry.is_some_and(|entry| entry.dirty_seq.is_some_and(|s| s > have));
                let in_history = outbound
                    .and_then(|outbound| outbound.history.get(&key))
                    .filter(|(seq, _)| *seq > have);
                if !in_cache && in_history.is_none() {
                    continue;
                }
                let image = match (entry, in_history) {
                    (Some(entry), _) => {
                        from_cache = true;
                        entry.image.clone()
                    }
                    (None, Some((_, image))) => {
                        from_history = true;
                        image.clone()
                    }
                    (None, None) => unreachable!("checked above"),
                };
                blocks.push((key, image));
            }
            if from_cache {
                self.marks.hit(Mark::StrictReadFromCache);
            }
            if from_history {
                self.marks.hit(Mark::StrictReadFromHistory);
            }
            answer(self, Ok(blocks));
            return;
        }
        // The site is too far behind for a diff: send the whole range.
        self.marks.hit(Mark::StrictReadWholeRange);
        self.read_whole_range(from, id, volume, offset, length);
    }

    /// Answers read `id` of `from` with every block of the range.
    fn read_whole_range(
        &mut self,
        from: SiteId,
        id: u64,
        volume: VolumeId,
        offset: u64,
        length: u64,
    ) {
        let block_bytes = BLOCK_SIZE as u64;
        let first_block = offset / block_bytes;
        let end_block = (offset + length).div_ceil(block_bytes);
        let internal = self.new_internal(Internal::Read {
            peer: from,
            id,
            volume,
            first_block,
        });
        self.start_read(
            internal,
            volume,
            first_block * block_bytes,
            (end_block - first_block) * block_bytes,
            None,
        );
    }

    /// Holds `message` (a strict read or a forwarded request for `group`,
    /// which this site does not own) if it comes from the site this site
    /// takes for the owner: that site sends it here only because it handed
    /// the group to this site, and this site will learn so shortly. Not
    /// served before then, so never by a site that does not own the group.
    /// False (the caller refuses it) otherwise or past the bound.
    fn await_ownership(&mut self, group: GroupId, from: SiteId, message: SiteMessage) -> bool {
        if self.owner_of(group) != from
            || from == self.config.site
            || self.replication.awaiting_ownership_count >= AWAITING_OWNERSHIP_MAX
        {
            return false;
        }
        // Answered (refused) well before the sender gives up on it.
        let deadline = self
            .now
            .saturating_add_millis(self.config.remote_timeout_ms / 2);
        self.marks.hit(Mark::AwaitedOwnership);
        self.replication.awaiting_ownership_count += 1;
        self.replication
            .awaiting_ownership
            .entry(group)
            .or_default()
            .push_back(AwaitingOwnership {
                deadline,
                from,
                message,
            });
        true
    }

    /// Refuses the requests that waited for a change of owner too long.
    pub(in crate::engine) fn expire_awaiting_ownership(&mut self, now: Timestamp) {
        let groups: Vec<GroupId> = self
            .replication
            .awaiting_ownership
            .keys()
            .copied()
            .collect();
        for group in groups {
            let Some(waiting) = self.replication.awaiting_ownership.get_mut(&group) else {
                continue;
            };
            let mut expired = Vec::new();
            while waiting
                .front()
                .is_some_and(|request| request.deadline <= now)
            {
                expired.extend(waiting.pop_front());
            }
            if waiting.is_empty() {
                self.replication.awaiting_ownership.remove(&group);
            }
            self.replication.awaiting_ownership_count -= expired.len();
            for request in expired {
                let error = RequestError::Io(format!(
                    "site {} does not own the volume (it was not told it does within {} ms)",
                    self.config.site,
                    self.config.remote_timeout_ms / 2
                ));
                let reply = match request.message {
                    SiteMessage::Forward { id, .. } => SiteMessage::ForwardReply {
                        id,
                        result: Err(error),
                    },
                    SiteMessage::ReadRequest { id, .. } => SiteMessage::ReadReply {
                        id,
                        result: Err(error),
                    },
                    other => unreachable!(
                        "engine invariant: only requests await ownership, not {other:?}"
                    ),
                };
                self.actions.push_back(Action::Send {
                    peer: request.from,
                    message: reply,
                });
            }
        }
    }

    pub(super) fn receive_forward(&mut self, from: SiteId, id: u64, request: Request) {
        let volume = request.volume();
        let owned = self
            .volume(volume)
            .is_some_and(|spec| self.owner_of(spec.group) == self.config.site);
        if !owned
            && let Some(spec) = self.volume(volume)
            && self.await_ownership(
                spec.group,
                from,
                SiteMessage::Forward {
                    id,
                    request: request.clone(),
                },
            )
        {
            return;
        }
        if !owned {
            let result = match self.volume(volume) {
                None => Err(RequestError::NoVolume(volume)),
                Some(_) => Err(RequestError::Io(format!(
                    "site {} does not own volume {volume}",
                    self.config.site
                ))),
            };
            self.actions.push_back(Action::Send {
                peer: from,
                message: SiteMessage::ForwardReply { id, result },
            });
            return;
        }
        let internal = self.new_internal(Internal::Forward { peer: from, id });
        let now = self.now;
        self.submit(now, internal, request);
    }

    /// True if `request` is one another site forwarded here.
    pub(in crate::engine) fn is_forwarded(&self, request: RequestId) -> bool {
        matches!(
            self.replication.internal.get(&request),
            Some(Internal::Forward { .. })
        )
    }

    pub(super) fn new_internal(&mut self, purpose: Internal) -> RequestId {
        let request = RequestId(INTERNAL_REQUEST_BASE + self.replication.next_internal);
        self.replication.next_internal += 1;
        self.replication.internal.insert(request, purpose);
        request
    }

    /// The answer to a request the engine issued itself.
    pub(in crate::engine) fn internal_reply(
        &mut self,
        request: RequestId,
        result: Result<Response, RequestError>,
    ) {
        let Some(purpose) = self.replication.internal.remove(&request) else {
            panic!("engine invariant: internal request {request} answered twice or never issued");
        };
        match purpose {
            Internal::Forward { peer, id } => self.actions.push_back(Action::Send {
                peer,
                message: SiteMessage::ForwardReply { id, result },
            }),
            Internal::Read {
                peer,
                id,
                volume,
                first_block,
            } => {
                let result = result.map(|response| match response {
                    Response::Data(data) => blocks_read(volume, first_block, &data),
                    Response::Done => Vec::new(),
                });
                self.actions.push_back(Action::Send {
                    peer,
                    message: SiteMessage::ReadReply { id, result },
                });
            }
            Internal::ResyncRead {
                peer,
                group,
                region,
                generation,
                stale,
            } => self.resync_read_done(peer, group, region, generation, stale, result),
            Internal::DrainCopy { group, region } => {
                self.local_drain_copy_done(group, region, result)
            }
        }
    }
}
