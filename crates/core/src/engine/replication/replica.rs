//! The replica's side of replication: taking deltas and resync chunks
//! from the owner in order (held until the mid-resync mark is durable),
//! journaling and applying them, acknowledging, resuming after a
//! reconnect, and its own strict reads and forwarded writes to the owner.

use super::*;

impl Engine {
    /// True if the group is durably marked mid-resync, and no save in
    /// flight unmarks it.
    pub(super) fn marked(&self, group: GroupId) -> bool {
        self.replication.marks.contains(&group)
            && self
                .replication
                .marks_saving
                .as_ref()
                .is_none_or(|saving| saving.contains(&group))
    }

    /// A delta or chunk from the owner must wait if it starts a resync of a
    /// group not durably marked as mid-resync (a crash after its journal
    /// replayed it would leave the legs at no delta boundary without
    /// anything saying so), or if earlier messages of its stream wait.
    pub(super) fn hold_until_marked(&mut self, from: SiteId, message: &SiteMessage) -> bool {
        let (group, chunk) = match message {
            SiteMessage::Delta(record) | SiteMessage::Deltas { record, .. } => {
                (record.group, false)
            }
            SiteMessage::Resync { group, .. } => (*group, true),
            _ => return false,
        };
        if from == self.config.site || self.owner_of(group) != from {
            // Refused by the normal path.
            return false;
        }
        if let SiteMessage::Resync { resume, .. } = message
            && self.stale_chunk(group, *resume)
        {
            // Refused by the normal path.
            return false;
        }
        let waiting = self
            .replication
            .inbound
            .get(&group)
            .is_some_and(|inbound| !inbound.held.is_empty());
        if waiting {
            return true;
        }
        if !chunk || self.marked(group) {
            return false;
        }
        self.save_resync_marks(Some(group));
        true
    }

    /// Saves the set of groups mid-resync here (plus `starting`, whose
    /// first chunk is about to be held) if it changed. One save is in
    /// flight at a time; a change meanwhile is saved after it.
    pub(in crate::engine) fn save_resync_marks(&mut self, starting: Option<GroupId>) {
        if self.replication.marks_saving.is_some() {
            self.replication.marks_stale = true;
            return;
        }
        let wanted: BTreeSet<GroupId> = self
            .replication
            .inbound
            .iter()
            .filter(|(_, inbound)| {
                inbound.resync.is_some()
                    || inbound
                        .held
                        .iter()
                        .any(|(_, message)| matches!(message, SiteMessage::Resync { .. }))
            })
            .map(|(group, _)| *group)
            .chain(starting)
            .chain(self.fast_drain_targets())
            .collect();
        if wanted == self.replication.marks {
            return;
        }
        let io = self.new_io(IoPurpose::MarksSave);
        self.replication.marks_saving = Some(wanted.clone());
        self.actions.push_back(Action::SaveResyncMarks {
            io,
            groups: wanted.into_iter().collect(),
        });
    }

    pub(in crate::engine) fn send_resume(&mut self, group: GroupId) {
        // A site taking the group over refuses the stream a resume asks for.
        if self.is_taking_over(group) {
            return;
        }
        let Some(state) = self.groups.get(&group) else {
            return;
        };
        let owner = state.owner;
        let have = (!self.mid_resync_here(group)).then(|| DeltaSeq(state.next_seq.0 - 1));
        let have_epoch = have.and(state.last_epoch);
        let lost_regions = self.lost_regions_to_send(group);
        if have.is_none() {
            self.marks.hit(Mark::ResumedMidResync);
        }
        // Resume ids come from the request-id counter: unique across this
        // site's restarts too.
        let resume = self.replication.next_remote;
        self.replication.next_remote += 1;
        self.replication.inbound.entry(group).or_default().resume = resume;
        self.actions.push_back(Action::Send {
            peer: owner,
            message: SiteMessage::Resume {
                group,
                have,
                have_epoch,
                lost_regions,
                resume,
            },
        });
        // Acks sent on an earlier connection may be lost, and the owner
        // may have restarted: say again what the journal and the legs hold.
        // Without it a FLUSH waiting for this site's journal, or a backlog
        // waiting for its legs (holding writes back past the bound), waits
        // forever when nothing new is shipped. Acks of resync chunks sent
        // before mean nothing to the resync the owner starts on a resume.
        // Held messages predate the resume too: the owner sends again
        // whatever `have` lacks.
        if let Some(inbound) = self.replication.inbound.get_mut(&group) {
            inbound.journaled_reported = DeltaSeq(0);
            inbound.chunk_positions.clear();
            inbound.held.clear();
        }
        self.save_resync_marks(None);
        if self.diverged_here(group) {
            // What it holds past the failover point is its own line: acks
            // of those seqs would tell the owner that its own deltas of
            // the same numbers are here. The owner resyncs it whole.
            self.marks.hit(Mark::DivergedResume);
            return;
        }
        self.send_replica_acks(group);
        let state = &self.groups[&group];
        let applied = state
            .closed
            .iter()
            .filter(|delta| !delta.resync)
            .map(|delta| DeltaSeq(delta.first.0 - 1))
            .min()
            .unwrap_or(DeltaSeq(state.next_seq.0 - 1));
        if applied > DeltaSeq(0) {
            self.actions.push_back(Action::Send {
                peer: owner,
                message: SiteMessage::Applied {
                    group,
                    seq: applied,
                },
            });
        }
    }

    /// At a replica: `group`'s leg is mid-resync (at no delta boundary).
    pub(in crate::engine) fn mid_resync_here(&self, group: GroupId) -> bool {
        self.replication
            .inbound
            .get(&group)
            .is_some_and(|inbound| inbound.resync.is_some())
    }

    /// Why a snapshot read cannot be served here now, if it cannot.
    pub(in crate::engine) fn snapshot_unavailable(&self, group: GroupId) -> Option<String> {
        if self.diverged_here(group) {
            return Some(format!(
                "group {group} here holds deltas a failover discarded: site {} resyncs it first",
                self.owner_of(group)
            ));
        }
        let inbound = self.replication.inbound.get(&group)?;
        inbound.resync.as_ref()?;
        Some(format!(
            "group {group} is resyncing from site {}: its image here is not at a delta boundary",
            self.owner_of(group)
        ))
    }

    /// Takes the deltas `first..=record.seq` merged into `record` (a lone
    /// delta has `first == record.seq`).
    pub(super) fn receive_delta(&mut self, from: SiteId, first: DeltaSeq, record: DeltaRecord) {
        let group_id = record.group;
        if first > record.seq {
            self.stats.refused_messages_total += 1;
            return;
        }
        let site = self.config.site;
        // Holding deltas a failover discarded, this site numbers past the
        // owner's line: the owner's delta of a seq held here is not the
        // one held, and its next one does not follow what is held. Only a
        // resync's first chunk puts this site back on the owner's line
        // (the owner resyncs such a site before it streams to it); the
        // deltas that follow it are the resync's.
        if !self.mid_resync_here(group_id) && self.diverged_here(group_id) {
            self.stats.refused_messages_total += 1;
            return;
        }
        let group = self
            .groups
            .entry(group_id)
            .or_insert_with(|| Group::new(DeltaSeq(1), from));
        if group.owner != from || from == site {
            self.stats.refused_messages_total += 1;
            return;
        }
        // Fencing (G1): a delta written under an epoch older than the one
        // this site knows for the group is from an ownership that ended.
        if record.epoch < group.epoch {
            self.stats.refused_messages_total += 1;
            return;
        }
        let expected = group.next_seq;
        if record.seq < expected {
            // Sent again after a reconnect: already queued here.
            self.marks.hit(Mark::DuplicateDelta);
            self.send_replica_acks(group_id);
            return;
        }
        let gap_accepted = self.config.planted_bug == Some(PlantedBug::AcceptDeltaGap);
        // A merged record may start before what is held here (sent again
        // after a reconnect): laid over any image from `first - 1` on, it
        // gives the image after its last delta all the same.
        if first > expected && !gap_accepted {
            // A predecessor is missing: ask for everything after what we hold.
            self.stats.refused_messages_total += 1;
            self.marks.hit(Mark::DeltaGapRefused);
            self.send_resume(group_id);
            return;
        }
        group.next_seq = DeltaSeq(record.seq.0 + 1);
        group.epoch = record.epoch;
        group.last_epoch = Some(record.epoch);
        self.replication.inbound.entry(group_id).or_default();
        let charge: u64 = record
            .blocks
            .iter()
            .map(|(_, image)| Entry::charge(image))
            .sum();
        // Memory for received deltas is bounded by the owner's backlog
        // bound; clean blocks make room where they can.
        self.make_room(charge);
        for (key, image) in &record.blocks {
            self.index.set_dirty(*key, image.clone(), record.seq);
        }
        self.dirty_bytes += charge;
        if first < record.seq {
            self.marks.hit(Mark::MergedDeltasReceived);
        }
        self.stats.received_deltas_total += 1;
        self.stats.received_bytes_total += record.data_bytes();
        self.enqueue_closed(
            group_id,
            record.epoch,
            record.seq,
            record.seq,
            record.blocks,
            charge,
            false,
        );
        // Of a record that starts before what is held here, only the
        // deltas after what is held are new.
        let first = first.max(expected);
        self.groups
            .get_mut(&group_id)
            .and_then(|group| group.closed.back_mut())
            .expect("engine invariant: the record just queued")
            .first = first;
    }

    /// True if a chunk answers a resume older than the latest one sent:
    /// the owner sent it before it heard the latest, and copies again, for
    /// the latest, whatever that older resync had not finished.
    pub(super) fn stale_chunk(&self, group: GroupId, resume: u64) -> bool {
        self.replication
            .inbound
            .get(&group)
            .is_none_or(|inbound| inbound.resume != resume)
    }

    pub(super) fn receive_resync(&mut self, from: SiteId, group_id: GroupId, chunk: Chunk) {
        let Chunk {
            blocks,
            last,
            base,
            consistent_at,
            consistent_epoch,
            resume,
        } = chunk;
        let stale = self.stale_chunk(group_id, resume);
        if self.owner_of(group_id) != from || from == self.config.site || stale {
            if stale {
                self.marks.hit(Mark::StaleChunkRefused);
            }
            self.stats.refused_messages_total += 1;
            return;
        }
        let inbound = self.replication.inbound.entry(group_id).or_default();
        let first_chunk = inbound.numbered_for != Some(resume);
        inbound.numbered_for = Some(resume);
        let group = self
            .groups
            .get_mut(&group_id)
            .expect("engine invariant: owner_of found the group");
        // Deltas after `base` follow the chunks on the same stream. The
        // first chunk sets the numbering to the owner's even if this site
        // numbered further: a site ahead of its owner (it owned the group
        // under an earlier epoch and wrote deltas the cluster lost) must
        // take the owner's next deltas, not refuse them as duplicates.
        // Its own deltas past `base` are overwritten: every region they
        // wrote comes (it named them in its resume, or every region does).
        group.next_seq = if first_chunk {
            DeltaSeq(base.0 + 1)
        } else {
            group.next_seq.max(DeltaSeq(base.0 + 1))
        };
        let current_epoch = group.epoch;
        // Recovery numbers the group after its newest journal record, in
        // journal order (a first chunk may number it below deltas the
        // journal still holds: a diverged site's own, or the line of an
        // owner a failover replaced). So the chunk's record names the
        // group's newest delta now: `base` for a first chunk, the newest
        // delta received since then for a later one (a later chunk must
        // not take the numbering back below the deltas that followed the
        // first). Its epoch is that delta's (the image's, at recovery):
        // the epoch `base` was written under, not the owner's current one,
        // or a site resynced right after a failover would read as
        // diverged after a restart. When `base` is the delta the resync is
        // consistent at, the owner names that epoch, and its word goes
        // before this site's history: the history here may lag the
        // owner's (the group moved away and back while this site was
        // away), and the resync ends with the owner's epoch as the
        // image's in memory, so the journal must say the same, or a
        // restart brings the site back on another line than it left.
        let newest = DeltaSeq(group.next_seq.0 - 1);
        let epoch = if newest > base {
            group.last_epoch.or_else(|| self.epoch_at(group_id, newest))
        } else if base == consistent_at && consistent_epoch.is_some() {
            consistent_epoch
        } else {
            self.epoch_at(group_id, base)
        }
        .unwrap_or(current_epoch);
        let inbound = self.replication.inbound.entry(group_id).or_default();
        let resync = inbound.resync.get_or_insert(InboundResync {
            last_received: false,
            consistent_at,
            consistent_epoch,
        });
        resync.last_received = last;
        // The first chunk answering a resume starts a new resync: where an
        // earlier one (perhaps from an owner a failover replaced, whose
        // seqs ran further) would have been consistent no longer matters.
        if first_chunk || consistent_at >= resync.consistent_at {
            resync.consistent_at = consistent_at;
            resync.consistent_epoch = consistent_epoch;
        }
        if blocks.is_empty() {
            inbound.chunk_positions.push_back(0);
        } else {
            let tag = DeltaSeq(RESYNC_TAG_BASE + self.replication.next_resync_tag);
            self.replication.next_resync_tag += 1;
            let charge: u64 = blocks.iter().map(|(_, image)| Entry::charge(image)).sum();
            self.make_room(charge);
            for (key, image) in &blocks {
                self.index.set_dirty(*key, image.clone(), tag);
            }
            self.dirty_bytes += charge;
            let record = self.enqueue_closed(group_id, epoch, newest, tag, blocks, charge, true);
            self.replication
                .inbound
                .get_mut(&group_id)
                .expect("engine invariant: inbound created above")
                .chunk_positions
                .push_back(record.position.0);
        }
        self.send_replica_acks(group_id);
        self.check_consistent(group_id);
    }

    /// Acknowledges, in order, the deltas and chunks of a group the journal
    /// now holds durably.
    pub(super) fn send_replica_acks(&mut self, group_id: GroupId) {
        if self.diverged_here(group_id) {
            // Its seqs past the failover point are its own line's: the
            // owner numbers its own deltas the same way (see `send_resume`).
            return;
        }
        let synced = self.journal.synced_upto;
        let Some(state) = self.groups.get(&group_id) else {
            return;
        };
        let owner = state.owner;
        let journaled = if state.last_position <= synced {
            DeltaSeq(state.next_seq.0 - 1)
        } else {
            state
                .closed
                .iter()
                .filter(|delta| !delta.resync && delta.position.0 <= synced)
                .map(|delta| delta.seq)
                .max()
                .unwrap_or(DeltaSeq(0))
        };
        let Some(inbound) = self.replication.inbound.get_mut(&group_id) else {
            return;
        };
        let mut messages = chunk_acks(group_id, inbound);
        if journaled > inbound.journaled_reported {
            inbound.journaled_reported = journaled;
            messages.push(SiteMessage::Journaled {
                group: group_id,
                seq: journaled,
            });
        } else if messages.is_empty() && inbound.journaled_reported > DeltaSeq(0) {
            // A duplicate delta: say again what we hold.
            messages.push(SiteMessage::Journaled {
                group: group_id,
                seq: inbound.journaled_reported,
            });
        }
        for message in messages {
            self.actions.push_back(Action::Send {
                peer: owner,
                message,
            });
        }
    }

    /// A delta or chunk reached the legs.
    pub(in crate::engine) fn replica_applied(&mut self, group_id: GroupId, delta: &ClosedDelta) {
        if !self.config.peers.is_empty() {
            self.mark_resync_reads_stale(&delta.blocks);
        }
        let owner = self.owner_of(group_id);
        if owner == self.config.site {
            return;
        }
        if !delta.resync && !self.diverged_here(group_id) {
            // (A diverged site's seqs name its own line's deltas: see
            // `send_replica_acks`.)
            self.actions.push_back(Action::Send {
                peer: owner,
                message: SiteMessage::Applied {
                    group: group_id,
                    seq: delta.seq,
                },
            });
        } else if let Some(inbound) = self.replication.inbound.get_mut(&group_id) {
            inbound.chunk_applied_upto = inbound.chunk_applied_upto.max(delta.position.0);
            for message in chunk_acks(group_id, inbound) {
                self.actions.push_back(Action::Send {
                    peer: owner,
                    message,
                });
            }
        }
        self.check_consistent(group_id);
    }

    pub(super) fn check_consistent(&mut self, group_id: GroupId) {
        let Some(state) = self.groups.get(&group_id) else {
            return;
        };
        let Some(inbound) = self.replication.inbound.get_mut(&group_id) else {
            return;
        };
        let Some(resync) = &inbound.resync else {
            return;
        };
        let chunks_pending = state.closed.iter().any(|delta| delta.resync);
        let deltas_pending = state
            .closed
            .iter()
            .any(|delta| !delta.resync && delta.first <= resync.consistent_at);
        let received = DeltaSeq(state.next_seq.0 - 1) >= resync.consistent_at;
        if resync.last_received && !chunks_pending && !deltas_pending && received {
            // The image is the owner's at `consistent_at`, plus the deltas
            // received after it (each recorded its own epoch).
            if DeltaSeq(state.next_seq.0 - 1) == resync.consistent_at {
                let epoch = resync.consistent_epoch;
                self.groups
                    .get_mut(&group_id)
                    .expect("engine invariant: looked up above")
                    .last_epoch = epoch;
            }
            self.replication
                .inbound
                .get_mut(&group_id)
                .expect("engine invariant: looked up above")
                .resync = None;
            self.save_resync_marks(None);
        }
    }

    /// A request at a site that does not own the volume: strict reads ask
    /// the owner for newer blocks, everything else is forwarded.
    pub(in crate::engine) fn submit_remote(
        &mut self,
        request_id: RequestId,
        spec: &VolumeSpec,
        request: Request,
    ) {
        let owner = self.owner_of(spec.group);
        let id = self.replication.next_remote;
        self.replication.next_remote += 1;
        let deadline = self
            .now
            .saturating_add_millis(self.config.remote_timeout_ms);
        let (kind, message) = match request {
            Request::Read {
                volume,
                offset,
                length,
            } => {
                if let Err(error) = check_range(spec, offset, length) {
                    self.reply(request_id, Err(error));
                    return;
                }
                if self.serve_under_read_lease(request_id, spec, volume, offset, length) {
                    return;
                }
                self.stats.remote_reads_total += 1;
                self.count_remote_strict_read(volume);
                self.ask_read_lease(spec.group, volume, offset, length);
                // The owner answers with what changed after `have` in its
                // own history: a site mid-resync holds no delta boundary,
                // and one that kept deltas a failover discarded numbers
                // them as the new owner numbers different ones. Both need
                // the whole range.
                let diverged = self.diverged_here(spec.group);
                let have = (!self.mid_resync_here(spec.group) && !diverged)
                    .then(|| DeltaSeq(self.groups[&spec.group].next_seq.0 - 1));
                if diverged {
                    self.marks.hit(Mark::DivergedWholeRead);
                }
                (
                    RemoteKind::Read {
                        volume,
                        offset,
                        length,
                    },
                    SiteMessage::ReadRequest { id, request, have },
                )
            }
            request => {
                self.stats.forwarded_total += 1;
                (RemoteKind::Forward, SiteMessage::Forward { id, request })
            }
        };
        self.replication.remote.insert(
            id,
            RemoteOp {
                request: request_id,
                deadline,
                kind,
            },
        );
        self.replication.remote_deadlines.insert((deadline, id));
        self.actions.push_back(Action::Send {
            peer: owner,
            message,
        });
    }

    /// At a site that just took `group` over: its strict reads waiting
    /// for the old owner are served here instead. Its image is the group's
    /// newest now, and the old owner (cut off, most likely: that is why the
    /// group moved) may never answer: the reads would fail at their
    /// timeout although the volume is served here.
    pub(in crate::engine) fn serve_remote_reads_here(&mut self, group: GroupId) {
        let volumes = self.volumes_of(group);
        let waiting: Vec<u64> = self
            .replication
            .remote
            .iter()
            .filter(|(_, op)| {
                matches!(op.kind, RemoteKind::Read { volume, .. } if volumes.contains(&volume))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            let Some(op) = self.take_remote(id) else {
                continue;
            };
            let RemoteKind::Read {
                volume,
                offset,
                length,
            } = op.kind
            else {
                continue;
            };
            self.stats.remote_reads_served_here_total += 1;
            self.marks.hit(Mark::RemoteReadServedAfterTakeover);
            let now = self.now;
            self.submit(
                now,
                op.request,
                Request::Read {
                    volume,
                    offset,
                    length,
                },
            );
        }
    }

    pub(super) fn take_remote(&mut self, id: u64) -> Option<RemoteOp> {
        let op = self.replication.remote.remove(&id)?;
        self.replication.remote_deadlines.remove(&(op.deadline, id));
        Some(op)
    }

    pub(super) fn receive_read_reply(
        &mut self,
        id: u64,
        result: Result<Vec<(BlockKey, BlockImage)>, RequestError>,
    ) {
        let Some(op) = self.take_remote(id) else {
            self.stats.refused_messages_total += 1;
            return;
        };
        let RemoteKind::Read {
            volume,
            offset,
            length,
        } = op.kind
        else {
            self.stats.refused_messages_total += 1;
            self.reply(
                op.request,
                Err(RequestError::Io("owner answered a write with data".into())),
            );
            return;
        };
        let blocks = match result {
            Ok(blocks) => blocks,
            Err(error) => {
                self.reply(op.request, Err(error));
                return;
            }
        };
        let span = block_span(offset, length);
        let mut overlay = BTreeMap::new();
        for (key, image) in blocks {
            let valid_image = match &image {
                BlockImage::Data(data) => data.len() == BLOCK_SIZE,
                BlockImage::Zero => true,
            };
            if key.volume != volume || !span.contains(&key.block) || !valid_image {
                self.stats.refused_messages_total += 1;
                let error = RequestError::Io("owner sent blocks outside the read".into());
                self.reply(op.request, Err(error));
                return;
            }
            overlay.insert(key.block, image);
        }
        if self.volume(volume).is_none() {
            self.reply(op.request, Err(RequestError::NoVolume(volume)));
            return;
        }
        self.start_read(op.request, volume, offset, length, Some(&overlay));
    }

    /// Fails strict reads and forwarded requests whose owner did not answer
    /// in time.
    pub(in crate::engine) fn expire_remote(&mut self, now: Timestamp) {
        while let Some((deadline, id)) = self.replication.remote_deadlines.first().copied() {
            if deadline > now {
                break;
            }
            let Some(op) = self.take_remote(id) else {
                continue;
            };
            self.stats.remote_timeouts_total += 1;
            self.marks.hit(Mark::RemoteTimedOut);
            if matches!(op.kind, RemoteKind::Forward)
                && self.config.planted_bug == Some(PlantedBug::ForwardTimeoutSucceeds)
            {
                self.reply(op.request, Ok(Response::Done));
                continue;
            }
            let error = RequestError::Io(format!(
                "the owner site did not answer within {} ms",
                self.config.remote_timeout_ms
            ));
            self.reply(op.request, Err(error));
        }
    }
}

/// Acknowledges, in order, the resync chunks now on the legs (an empty
/// chunk, never journaled, once every chunk before it is).
fn chunk_acks(group: GroupId, inbound: &mut Inbound) -> Vec<SiteMessage> {
    let mut messages = Vec::new();
    while let Some(position) = inbound.chunk_positions.front() {
        if *position != 0 && *position > inbound.chunk_applied_upto {
            break;
        }
        inbound.chunk_positions.pop_front();
        messages.push(SiteMessage::ResyncAck {
            group,
            resume: inbound.resume,
        });
    }
    messages
}
