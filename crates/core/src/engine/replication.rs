//! The multi-site half of the engine: shipping closed deltas to the other
//! sites in order, receiving them, strict reads and forwarded requests at a
//! site that does not own a volume, and resync of a site that fell behind.
//!
//! Rules, in addition to the single-site ones:
//! - an owner ships a delta only after its own journal holds it durably, so
//!   a replica never holds a delta its owner could lose in a crash and then
//!   number differently;
//! - a replica queues a received delta only if it is the next of its group,
//!   journals it, acknowledges it (`Journaled`) once synced, applies it in
//!   order and acknowledges that (`Applied`);
//! - an owner keeps every delta until every site applied it, within
//!   `backlog_bytes_max`; a site that is disconnected when the bound is
//!   passed falls back to a resync of the 1 MiB regions it missed;
//! - a resync chunk holds the owner's image of a region at the moment it is
//!   sent (re-read if a leg write touched the region meanwhile); the
//!   replica's leg is at a delta boundary again once the last chunk and
//!   every delta up to `consistent_at` are applied;
//! - like a delta, a chunk leaves only once the owner's journal holds what
//!   it shows (its open-delta blocks, its base, its `consistent_at`);
//! - a replica saves that a group is mid-resync (`SaveResyncMarks`) before
//!   the first chunk of a resync reaches its journal, and clears it once
//!   whole: after a crash it still refuses snapshot reads and resumes
//!   asking for every region;
//! - every resume carries an id, echoed by the chunks and acks of the
//!   resync that answers it; what answers an earlier resume is refused;
//!   with every resume the replica repeats what it journaled and applied;
//! - chunks are acknowledged once on the replica's legs, at most 4 in
//!   flight per site (all groups together);
//! - abandoning a resync (connection lost, or a new resume) makes every
//!   region it had not finished dirty again at once;
//! - only a streaming site (or one away after streaming) counts for
//!   flush-sync and sync durability: a site mid-resync may lack the writes
//!   of deltas it reports journaled;
//! - while a snapshot read at a replica reads its leg parts, no new delta
//!   of its group starts onto the legs (the image stays whole-delta);
//! - ids of requests sent to an owner, and of resumes, start above every
//!   id an earlier run of the site issued.

use super::*;

mod failover;

pub use failover::EpochStart;

/// Requests the engine issues itself (forwarded from other sites, resync
/// reads) are numbered from here; drivers number theirs below it.
const INTERNAL_REQUEST_BASE: u64 = 1 << 63;
/// Cache tags of resync chunks are numbered from here, far above any seq.
const RESYNC_TAG_BASE: u64 = 1 << 62;
/// Resync copies regions of this many blocks (1 MiB).
pub const REGION_BLOCKS: u64 = 256;
/// Region reads and chunks not yet on the other site's legs, per site
/// being resynced (all its groups together): what a resync may add to that
/// site's memory.
const RESYNC_CHUNKS_IN_FLIGHT: usize = 4;

/// Where a site stands with respect to a group this site owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Not connected, or connected but not yet resumed: deltas are kept.
    Waiting,
    /// Receiving deltas as they close.
    Streaming,
    /// Receiving the regions it missed, then deltas.
    Resyncing,
    /// Fell too far behind while away: needs a resync when it returns.
    NeedsResync,
}

/// One other site's progress on a group owned here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReplication {
    pub peer: SiteId,
    pub state: PeerState,
    pub shipped: DeltaSeq,
    pub journaled: DeltaSeq,
    pub applied: DeltaSeq,
    /// Closed deltas (and their bytes) the site has not applied yet.
    pub unapplied_deltas: u64,
    pub unapplied_bytes: u64,
    /// Age of the oldest delta the site has not journaled: the live RPO.
    pub lag_nanos: u64,
    pub resync_regions_left: u64,
}

/// Replication state of one group, as seen from this site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReplication {
    pub group: GroupId,
    pub owner: SiteId,
    pub epoch: Epoch,
    /// Newest delta closed (at the owner) or received (at a replica).
    pub last_seq: DeltaSeq,
    /// Filled at the owner: one entry per other site.
    pub peers: Vec<PeerReplication>,
    /// False at a replica whose leg is mid-resync (not at a delta boundary).
    pub consistent: bool,
}

#[derive(Debug, Default)]
pub(super) struct Replication {
    outbound: BTreeMap<GroupId, Outbound>,
    inbound: BTreeMap<GroupId, Inbound>,
    connected: BTreeSet<SiteId>,
    remote: BTreeMap<u64, RemoteOp>,
    remote_deadlines: BTreeSet<(Timestamp, u64)>,
    next_remote: u64,
    internal: BTreeMap<RequestId, Internal>,
    next_internal: u64,
    backlog_bytes: u64,
    backlog_deltas: u64,
    next_resync_tag: u64,
    /// Groups this site is handing over to another owner, with the writes
    /// held meanwhile (bounded by what clients may have in flight).
    handing_over: BTreeMap<GroupId, Vec<(RequestId, Request)>>,
    /// Per other site: the regions it may lack as last saved (or being
    /// saved), and whether a map was ever saved this run.
    durable_maps: BTreeMap<SiteId, (BTreeSet<(VolumeId, u64)>, bool)>,
    /// A journal release waiting for this many map saves.
    pub(super) release_waiting: Option<(u64, usize)>,
    /// Since when writes have been waiting on a full backlog (reset when
    /// one is admitted past it): after `backlog_wait_ms_max` the sites
    /// holding the backlog back are folded into regions.
    pub(super) backlog_wait_since: Option<Timestamp>,
    /// Groups durably marked as mid-resync here (the last completed save).
    marks: BTreeSet<GroupId>,
    /// The set a save in flight writes.
    marks_saving: Option<BTreeSet<GroupId>>,
    /// Per group, where each ownership epoch's deltas start, oldest first
    /// (see [`Engine::set_epoch_history`]).
    epoch_history: BTreeMap<GroupId, Vec<EpochStart>>,
    /// Groups this site is taking over: their deltas and chunks are
    /// refused (see [`Engine::begin_takeover`]).
    taking_over: BTreeSet<GroupId>,
    /// Groups this site owned until another took them without a
    /// hand-over, waiting for the history to say what was lost.
    lost_ownership: BTreeMap<GroupId, failover::LostOwnership>,
    /// The wanted set changed while a save was in flight.
    marks_stale: bool,
}

/// A group this site owns.
#[derive(Debug, Default)]
struct Outbound {
    peers: BTreeMap<SiteId, PeerProgress>,
    /// Closed deltas not yet applied at every site, oldest first.
    retained: VecDeque<Retained>,
    /// Newest seq (and image) of each block in `retained`, so a strict read
    /// can be answered with only the blocks newer than what a site holds.
    history: BTreeMap<BlockKey, (DeltaSeq, BlockImage)>,
    /// Deltas up to here are no longer retained (or predate this run).
    retired_upto: DeltaSeq,
    /// The newest delta when this run started owning the group: what a
    /// site lacks of the deltas up to it is unknown here (unless a saved
    /// map says).
    known_from: DeltaSeq,
}

#[derive(Debug)]
struct Retained {
    seq: DeltaSeq,
    position: u64,
    record: DeltaRecord,
    bytes: u64,
    closed_at: Timestamp,
}

#[derive(Debug)]
struct PeerProgress {
    state: PeerState,
    shipped: DeltaSeq,
    journaled: DeltaSeq,
    applied: DeltaSeq,
    /// Regions (volume, first block / REGION_BLOCKS) the site may lack.
    dirty: BTreeSet<(VolumeId, u64)>,
    /// Every region of the group's volumes must be assumed dirty (the
    /// deltas the site missed are no longer known here).
    dirty_all: bool,
    /// Deltas up to here are covered by the resync in progress.
    resync_base: DeltaSeq,
    resync_reading: usize,
    /// Chunks sent and not yet acknowledged, oldest first.
    resync_unacked: VecDeque<(VolumeId, u64)>,
    resync_generation: u64,
    /// The chunk marked `last` went out in this resync.
    last_chunk_sent: bool,
    /// A chunk of this resync was built (sent, or held for the journal).
    /// Deltas wait for it: the first chunk sets the site's numbering to
    /// the owner's, and a delta ahead of it would reach a site numbered
    /// elsewhere (past it, if it holds deltas a failover discarded, or
    /// short of it), which drops or refuses it.
    chunk_built: bool,
    /// What this site knows the site lacks came from a saved map at start
    /// (this node restarted). A map says nothing of a resync that copied
    /// every region (a site whose deltas diverged, or lacked retired ones):
    /// such a resync is not in the journal either, and a map saved before
    /// it began lacks it. So a site resuming mid-resync then gets every
    /// region again. Cleared by the site's next resume.
    restored: bool,
    /// Chunks built but not sent yet, oldest first, each with the journal
    /// position the local journal must hold durably before it may leave.
    held_chunks: VecDeque<(u64, SiteMessage)>,
    /// The site's latest resume: the chunks sent for it and their acks
    /// carry it; acks of an earlier one are ignored.
    resume: u64,
}

impl PeerProgress {
    fn new() -> Self {
        PeerProgress {
            state: PeerState::Waiting,
            shipped: DeltaSeq(0),
            journaled: DeltaSeq(0),
            applied: DeltaSeq(0),
            dirty: BTreeSet::new(),
            dirty_all: false,
            resync_base: DeltaSeq(0),
            resync_reading: 0,
            resync_unacked: VecDeque::new(),
            resync_generation: 0,
            last_chunk_sent: false,
            chunk_built: false,
            restored: false,
            held_chunks: VecDeque::new(),
            resume: 0,
        }
    }

    /// True while this site still needs delta `seq` kept for it.
    fn holds(&self, seq: DeltaSeq) -> bool {
        match self.state {
            PeerState::NeedsResync => false,
            PeerState::Resyncing if seq <= self.resync_base => false,
            _ => self.applied < seq,
        }
    }
}

/// A group owned by another site.
#[derive(Debug, Default)]
struct Inbound {
    journaled_reported: DeltaSeq,
    /// Journal positions of resync chunks not yet acknowledged, in order.
    chunk_positions: VecDeque<u64>,
    /// The latest resume sent: only chunks answering it are taken.
    resume: u64,
    /// Journal position of the newest resync chunk on the legs: chunks are
    /// acknowledged once applied, so the owner's window of chunks in
    /// flight bounds the memory they take here.
    chunk_applied_upto: u64,
    resync: Option<InboundResync>,
    /// The resume whose first chunk set this group's numbering to the
    /// owner's (see `receive_resync`).
    numbered_for: Option<u64>,
    /// Messages of the group's lane held, in order, until the group is
    /// durably marked as mid-resync (a new resync's first chunk waits for
    /// that, and what follows it on the stream waits behind it).
    held: VecDeque<(SiteId, SiteMessage)>,
}

/// A received [`SiteMessage::Resync`], unpacked.
#[derive(Debug)]
struct Chunk {
    blocks: Vec<(BlockKey, BlockImage)>,
    last: bool,
    base: DeltaSeq,
    consistent_at: DeltaSeq,
    consistent_epoch: Option<Epoch>,
    resume: u64,
}

#[derive(Debug)]
struct InboundResync {
    last_received: bool,
    consistent_at: DeltaSeq,
    /// The owner's epoch of delta `consistent_at`: the replica's newest
    /// delta once the resync is whole (unless deltas followed).
    consistent_epoch: Option<Epoch>,
}

#[derive(Debug)]
struct RemoteOp {
    request: RequestId,
    deadline: Timestamp,
    kind: RemoteKind,
}

#[derive(Debug)]
enum RemoteKind {
    Read {
        volume: VolumeId,
        offset: u64,
        length: u64,
    },
    Forward,
}

#[derive(Debug)]
enum Internal {
    Forward {
        peer: SiteId,
        id: u64,
    },
    Read {
        peer: SiteId,
        id: u64,
        volume: VolumeId,
        first_block: u64,
    },
    ResyncRead {
        peer: SiteId,
        group: GroupId,
        region: (VolumeId, u64),
        generation: u64,
        stale: bool,
    },
}

impl Replication {
    /// Site `peer`'s progress on `group`, if this site owns the group.
    fn progress_mut(&mut self, group: GroupId, peer: SiteId) -> Option<&mut PeerProgress> {
        self.outbound
            .get_mut(&group)
            .and_then(|outbound| outbound.peers.get_mut(&peer))
    }

    /// The state a restarted engine starts from: remote request ids above
    /// the earlier runs' (see [`super::RecoveredState::next_remote_id`]),
    /// and the groups whose legs were mid-resync.
    pub(super) fn recovered(next_remote: u64, resyncing: &BTreeSet<GroupId>) -> Self {
        let mut replication = Replication {
            next_remote,
            marks: resyncing.clone(),
            ..Replication::default()
        };
        for group in resyncing {
            replication.inbound.entry(*group).or_default().resync = Some(InboundResync {
                last_received: false,
                consistent_at: DeltaSeq(0),
                consistent_epoch: None,
            });
        }
        replication
    }

    pub(super) fn is_handing_over(&self, group: GroupId) -> bool {
        self.handing_over.contains_key(&group)
    }

    pub(super) fn hold(&mut self, group: GroupId, request: RequestId, body: Request) {
        self.handing_over
            .get_mut(&group)
            .expect("engine invariant: requests are held only during a hand-over")
            .push((request, body));
    }

    pub(super) fn next_deadline(&self) -> Option<Timestamp> {
        self.remote_deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// True if another site's journal holds every delta of `group` up to
    /// `seq`. A site mid-resync does not count, whatever it journaled: the
    /// regions not copied yet may lack the writes of those deltas.
    pub(super) fn some_peer_journaled(&self, group: GroupId, seq: DeltaSeq) -> bool {
        self.outbound.get(&group).is_some_and(|outbound| {
            outbound.peers.values().any(|peer| {
                matches!(peer.state, PeerState::Streaming | PeerState::Waiting)
                    && peer.journaled >= seq
            })
        })
    }

    pub(super) fn fill_stats(&self, stats: &mut EngineStats) {
        stats.backlog_bytes = self.backlog_bytes;
        stats.backlog_deltas = self.backlog_deltas;
        stats.resync_regions_left = self
            .outbound
            .values()
            .flat_map(|outbound| outbound.peers.values())
            .map(|peer| (peer.dirty.len() + peer.resync_unacked.len()) as u64)
            .sum();
    }
}

/// Stops keeping deltas for a site: the regions of every retained delta
/// it has not journaled become regions to resync.
fn fold(
    progress: &mut PeerProgress,
    retained: &VecDeque<Retained>,
    known_from: DeltaSeq,
    region_blocks: u64,
) {
    for retained in retained.iter().filter(|r| r.seq > progress.journaled) {
        progress
            .dirty
            .extend(regions_of(&retained.record, region_blocks));
    }
    if progress.journaled < known_from {
        // It may lack deltas from before this run, whose blocks are not
        // known here: every region must be copied.
        progress.dirty_all = true;
    }
    progress.state = PeerState::NeedsResync;
}

fn is_internal(request: RequestId) -> bool {
    request.0 >= INTERNAL_REQUEST_BASE
}

fn region_of(key: &BlockKey, region_blocks: u64) -> (VolumeId, u64) {
    (key.volume, key.block / region_blocks)
}

/// The regions a delta's blocks fall in (with repeats).
fn regions_of(
    record: &DeltaRecord,
    region_blocks: u64,
) -> impl Iterator<Item = (VolumeId, u64)> + '_ {
    record
        .blocks
        .iter()
        .map(move |(key, _)| region_of(key, region_blocks))
}

// ---------------------------------------------------------------------------
// Public API

impl Engine {
    /// The site that accepts writes for `group` now (this site for a group
    /// never assigned).
    pub fn owner_of(&self, group: GroupId) -> SiteId {
        self.groups
            .get(&group)
            .map_or(self.config.site, |state| state.owner)
    }

    /// Starts handing `group` over to another site: writes, flushes and
    /// trims are held from now on, and the open delta closes so it can
    /// reach the other sites. Refused unless this site owns the group.
    pub fn hand_over(&mut self, now: Timestamp, group: GroupId) -> Result<(), RequestError> {
        self.observe(now);
        if self.owner_of(group) != self.config.site || !self.groups.contains_key(&group) {
            return Err(RequestError::Io(format!(
                "site {} does not own group {group}",
                self.config.site
            )));
        }
        self.replication.handing_over.entry(group).or_default();
        self.close_delta(group);
        Ok(())
    }

    /// True once `to` holds every delta of `group` applied and no write of
    /// the group is in flight here: ownership can move without losing or
    /// reordering anything.
    pub fn hand_over_ready(&self, group: GroupId, to: SiteId) -> bool {
        let Some(state) = self.groups.get(&group) else {
            return false;
        };
        let last = DeltaSeq(state.next_seq.0 - 1);
        let in_group = |volume: VolumeId| {
            self.volumes
                .get(&volume)
                .is_some_and(|v| v.spec.group == group)
        };
        let busy = self
            .pending
            .values()
            .any(|pending| !matches!(pending, Pending::Read(_)) && in_group(pending.volume()))
            || self.throttled.iter().any(|write| in_group(write.volume));
        let caught_up = self
            .replication
            .outbound
            .get(&group)
            .and_then(|outbound| outbound.peers.get(&to))
            .is_some_and(|peer| peer.state == PeerState::Streaming && peer.applied >= last);
        self.replication.is_handing_over(group)
            && state.open.blocks.is_empty()
            && !busy
            && caught_up
    }

    /// Calls a hand-over off: held requests are served here.
    pub fn cancel_hand_over(&mut self, now: Timestamp, group: GroupId) {
        self.observe(now);
        self.release_held(group);
    }

    fn release_held(&mut self, group: GroupId) {
        let Some(held) = self.replication.handing_over.remove(&group) else {
            return;
        };
        let now = self.now;
        for (request, body) in held {
            self.submit(now, request, body);
        }
    }

    /// Records who owns `group` from now on, as the ownership authority
    /// decided. A replica that can reach the new owner asks it to resume.
    /// Requests held by a hand-over go to the new owner.
    pub fn set_owner(&mut self, group: GroupId, owner: SiteId, epoch: Epoch) {
        let site = self.config.site;
        // Whichever site owns it now, a takeover begun here is over: this
        // site owns the group (from the seq it reported) or follows the
        // owner named.
        self.replication.taking_over.remove(&group);
        let was_owner = self
            .groups
            .get(&group)
            .is_some_and(|state| state.owner == site);
        if owner == site {
            self.replication.lost_ownership.remove(&group);
        } else if was_owner {
            self.lose_ownership(group, owner, epoch);
        }
        let state = self
            .groups
            .entry(group)
            .or_insert_with(|| Group::new(DeltaSeq(1), owner));
        state.owner = owner;
        state.epoch = epoch;
        let last = DeltaSeq(state.next_seq.0 - 1);
        if owner == site {
            self.replication.inbound.remove(&group);
            let peers = self.config.peers.clone();
            let outbound = self
                .replication
                .outbound
                .entry(group)
                .or_insert_with(|| Outbound {
                    known_from: last,
                    ..Outbound::default()
                });
            outbound.retired_upto = outbound.retired_upto.max(last);
            for peer in peers {
                outbound.peers.entry(peer).or_insert_with(PeerProgress::new);
            }
            // A connected replica that has not resumed may have asked before
            // this site knew the group (ownership is applied at each site in
            // its own time) and been refused: it is asked to resume again.
            let waiting: Vec<SiteId> = outbound
                .peers
                .iter()
                .filter(|(peer, progress)| {
                    progress.state == PeerState::Waiting
                        && self.replication.connected.contains(*peer)
                })
                .map(|(peer, _)| *peer)
                .collect();
            for peer in waiting {
                self.actions.push_back(Action::Send {
                    peer,
                    message: SiteMessage::Rejoin { group },
                });
            }
            return;
        }
        if let Some(outbound) = self.replication.outbound.remove(&group) {
            for retained in outbound.retained {
                self.replication.backlog_bytes -= retained.bytes;
                self.replication.backlog_deltas -= 1;
            }
            // Its resyncs held slots of each site's window (shared by all
            // groups): another group's resync to that site may be waiting
            // for them, and nothing else would wake it (the site resumes
            // this group with its new owner, not here).
            let freed: Vec<SiteId> = outbound
                .peers
                .iter()
                .filter(|(_, progress)| progress.resync_reading + progress.resync_unacked.len() > 0)
                .map(|(peer, _)| *peer)
                .collect();
            for peer in freed {
                self.pump_peer(peer);
            }
        }
        self.replication.inbound.entry(group).or_default();
        if self.replication.connected.contains(&owner) {
            self.send_resume(group);
        }
        self.release_held(group);
        // Requests that waited for this site's lease are the new owner's
        // to serve now, under its lease.
        let volumes = self.volumes_of(group);
        self.resume_suspended(|volume| volumes.contains(&volume));
    }

    /// The volumes of `group`.
    pub(super) fn volumes_of(&self, group: GroupId) -> BTreeSet<VolumeId> {
        self.volumes
            .iter()
            .filter(|(_, state)| state.spec.group == group)
            .map(|(volume, _)| *volume)
            .collect()
    }

    /// A connection to `peer` is up (again).
    pub fn peer_up(&mut self, now: Timestamp, peer: SiteId) {
        self.observe(now);
        self.replication.connected.insert(peer);
        let replicated: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, state)| state.owner == peer)
            .map(|(group, _)| *group)
            .collect();
        for group in replicated {
            self.send_resume(group);
        }
    }

    /// The connection to `peer` is gone: whatever was in flight on it may
    /// be lost. Deltas are kept for it until it resumes.
    pub fn peer_down(&mut self, now: Timestamp, peer: SiteId) {
        self.observe(now);
        self.replication.connected.remove(&peer);
        let mut resyncing = Vec::new();
        for (group, outbound) in &mut self.replication.outbound {
            let Some(progress) = outbound.peers.get_mut(&peer) else {
                continue;
            };
            match progress.state {
                PeerState::Streaming => progress.state = PeerState::Waiting,
                PeerState::Resyncing => resyncing.push(*group),
                PeerState::Waiting | PeerState::NeedsResync => {}
            }
        }
        for group in resyncing {
            self.abandon_resync(group, peer);
        }
        // A site declared gone must not hold the owner's writes back: with
        // the backlog already full (it filled while the site still counted
        // as connected), what it lacks becomes regions at once.
        if self.backlog_full() && self.config.planted_bug != Some(PlantedBug::StallOnFullBacklog) {
            self.marks.hit(Mark::FoldGone);
            self.fold_absent_peers();
        }
        self.retire_shipped();
    }

    /// A message from the engine at site `from`. Messages are checked
    /// against this site's view (owner, sequence) and refused, never
    /// trusted, when they do not fit.
    pub fn receive(&mut self, now: Timestamp, from: SiteId, message: SiteMessage) {
        self.observe(now);
        if self.refused_while_taking_over(&message) {
            self.stats.refused_messages_total += 1;
            return;
        }
        if self.hold_until_marked(from, &message) {
            let group = match &message {
                SiteMessage::Delta(record) => record.group,
                SiteMessage::Resync { group, .. } => *group,
                _ => unreachable!("only deltas and chunks are held"),
            };
            self.replication
                .inbound
                .entry(group)
                .or_default()
                .held
                .push_back((from, message));
            return;
        }
        match message {
            SiteMessage::Delta(record) => self.receive_delta(from, record),
            SiteMessage::Journaled { group, seq } => {
                if let Some(progress) = self.peer_progress(group, from) {
                    if seq > progress.shipped {
                        // Not a delta of this line (see `Applied`).
                        self.stats.refused_messages_total += 1;
                        return;
                    }
                    progress.journaled = progress.journaled.max(seq);
                    self.answer_synced_waiters();
                }
            }
            SiteMessage::Applied { group, seq } => {
                if let Some(progress) = self.peer_progress(group, from) {
                    if seq > progress.shipped {
                        // A delta never shipped from here: the site numbers
                        // deltas of a line a failover discarded (its own,
                        // as the old owner) the way this site numbers its
                        // own. Counted, it would retire deltas the site
                        // lacks and answer flush-sync writes on journals
                        // that never held them.
                        self.stats.refused_messages_total += 1;
                        return;
                    }
                    progress.applied = progress.applied.max(seq);
                    progress.journaled = progress.journaled.max(seq);
                    self.answer_synced_waiters();
                    self.retire_shipped();
                }
            }
            SiteMessage::Resume {
                group,
                have,
                have_epoch,
                resume,
            } => self.receive_resume(from, group, have, have_epoch, resume),
            SiteMessage::Resync {
                group,
                blocks,
                last,
                base,
                consistent_at,
                consistent_epoch,
                resume,
            } => {
                let chunk = Chunk {
                    blocks,
                    last,
                    base,
                    consistent_at,
                    consistent_epoch,
                    resume,
                };
                self.receive_resync(from, group, chunk)
            }
            SiteMessage::ResyncAck { group, resume } => {
                self.receive_resync_ack(from, group, resume)
            }
            SiteMessage::Rejoin { group } => {
                if from == self.config.site || self.owner_of(group) != from {
                    self.stats.refused_messages_total += 1;
                    return;
                }
                self.marks.hit(Mark::Rejoined);
                self.send_resume(group);
            }
            SiteMessage::ReadRequest { id, request, have } => {
                self.receive_read_request(from, id, request, have)
            }
            SiteMessage::ReadReply { id, result } => self.receive_read_reply(id, result),
            SiteMessage::Forward { id, request } => self.receive_forward(from, id, request),
            SiteMessage::ForwardReply { id, result } => {
                let Some(op) = self.take_remote(id) else {
                    self.stats.refused_messages_total += 1;
                    return;
                };
                self.reply(op.request, result);
            }
        }
    }

    /// At start, before any peer connects: what the saved map of `peer`
    /// says it may lack (`None` if no map was ever saved: nothing is known,
    /// and a lagging site gets every region), plus the regions of the
    /// deltas recovery replayed (it may lack those too).
    pub fn restore_dirty_map(
        &mut self,
        peer: SiteId,
        saved: Option<BTreeSet<(VolumeId, u64)>>,
        replayed: &BTreeSet<(VolumeId, u64)>,
    ) {
        let Some(saved) = saved else {
            return;
        };
        let group_of: BTreeMap<VolumeId, GroupId> = self
            .volumes
            .iter()
            .map(|(volume, state)| (*volume, state.spec.group))
            .collect();
        for region in saved.iter().chain(replayed) {
            let Some(group) = group_of.get(&region.0) else {
                continue;
            };
            if let Some(progress) = self.replication.progress_mut(*group, peer) {
                progress.dirty.insert(*region);
            }
        }
        for outbound in self.replication.outbound.values_mut() {
            if let Some(progress) = outbound.peers.get_mut(&peer) {
                progress.state = PeerState::NeedsResync;
                progress.restored = true;
            }
        }
        self.replication.durable_maps.insert(peer, (saved, true));
        self.marks.hit(Mark::DirtyMapRestored);
    }

    /// The answer to an [`Action::SaveResyncMarks`].
    pub fn resync_marks_saved(&mut self, io: IoId, result: Result<(), String>) {
        let Some(IoPurpose::MarksSave) = self.ios.remove(&io) else {
            panic!("engine invariant: io {io} is not a resync-marks save in flight");
        };
        let saved = self
            .replication
            .marks_saving
            .take()
            .expect("engine invariant: a marks save in flight records its set");
        if let Err(reason) = result {
            self.fail(format!("saving the resync marks failed: {reason}"));
            return;
        }
        self.replication.marks = saved;
        if std::mem::take(&mut self.replication.marks_stale) {
            self.save_resync_marks(None);
        }
        // Chunks (and what followed them) held for a mark now saved.
        let ready: Vec<GroupId> = self
            .replication
            .inbound
            .iter()
            .filter(|(group, inbound)| !inbound.held.is_empty() && self.marked(**group))
            .map(|(group, _)| *group)
            .collect();
        for group in ready {
            let held = std::mem::take(
                &mut self
                    .replication
                    .inbound
                    .get_mut(&group)
                    .expect("engine invariant: listed above")
                    .held,
            );
            let now = self.now;
            for (from, message) in held {
                self.receive(now, from, message);
            }
        }
    }

    /// Replication state of every group, for status and metrics.
    pub fn replication_status(&self) -> Vec<GroupReplication> {
        let now = self.now;
        self.groups
            .iter()
            .map(|(group, state)| {
                let peers = self
                    .replication
                    .outbound
                    .get(group)
                    .map(|outbound| {
                        outbound
                            .peers
                            .iter()
                            .map(|(peer, progress)| {
                                let unapplied = outbound
                                    .retained
                                    .iter()
                                    .filter(|r| r.seq > progress.applied);
                                let (deltas, bytes) =
                                    unapplied.fold((0, 0), |(d, b), r| (d + 1, b + r.bytes));
                                let oldest_unjournaled = outbound
                                    .retained
                                    .iter()
                                    .find(|r| r.seq > progress.journaled)
                                    .map(|r| r.closed_at);
                                PeerReplication {
                                    peer: *peer,
                                    state: progress.state,
                                    shipped: progress.shipped,
                                    journaled: progress.journaled,
                                    applied: progress.applied,
                                    unapplied_deltas: deltas,
                                    unapplied_bytes: bytes,
                                    lag_nanos: oldest_unjournaled
                                        .map_or(0, |at| now.0.saturating_sub(at.0)),
                                    resync_regions_left: (progress.dirty.len()
                                        + progress.resync_unacked.len())
                                        as u64,
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                GroupReplication {
                    group: *group,
                    owner: state.owner,
                    epoch: state.epoch,
                    last_seq: DeltaSeq(state.next_seq.0 - 1),
                    peers,
                    consistent: self
                        .replication
                        .inbound
                        .get(group)
                        .is_none_or(|inbound| inbound.resync.is_none())
                        && !self.diverged_here(*group),
                }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Owner side

impl Engine {
    fn peer_progress(&mut self, group: GroupId, peer: SiteId) -> Option<&mut PeerProgress> {
        let found = self.replication.progress_mut(group, peer);
        if found.is_none() {
            self.stats.refused_messages_total += 1;
        }
        found
    }

    pub(super) fn backlog_full(&self) -> bool {
        self.replication.backlog_bytes > self.config.backlog_bytes_max
    }

    /// Keeps a just-closed delta for the other sites (shipped once the
    /// local journal holds it).
    pub(super) fn retain_for_peers(&mut self, record: &DeltaRecord) {
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
    fn fold_absent_peers(&mut self) {
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
    pub(super) fn check_backlog_wait(&mut self, now: Timestamp) {
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

    fn fold_lagging_peers(&mut self) {
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
    pub(super) fn save_dirty_maps(&mut self, upto: u64) -> usize {
        let mut saves = 0;
        let peers = self.config.peers.clone();
        for peer in peers {
            let mut regions: BTreeSet<(VolumeId, u64)> = BTreeSet::new();
            for outbound in self.replication.outbound.values() {
                let Some(progress) = outbound.peers.get(&peer) else {
                    continue;
                };
                if self.config.planted_bug != Some(PlantedBug::MapForgetsDirty) {
                    regions.extend(progress.dirty.iter().copied());
                }
                regions.extend(
                    progress
                        .resync_unacked
                        .iter()
                        .filter(|region| region.0 != VolumeId(u32::MAX)),
                );
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
    pub(super) fn retire_shipped(&mut self) {
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
    pub(super) fn after_journal_sync(&mut self) {
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

    /// Sends a site every retained delta after what it was shipped that the
    /// local journal holds durably.
    fn ship_ready(&mut self, group: GroupId, peer: SiteId) {
        let synced = self.journal.synced_upto;
        let Some(outbound) = self.replication.outbound.get_mut(&group) else {
            return;
        };
        let Some(progress) = outbound.peers.get_mut(&peer) else {
            return;
        };
        if !matches!(progress.state, PeerState::Streaming | PeerState::Resyncing) {
            return;
        }
        if progress.state == PeerState::Resyncing && !progress.chunk_built {
            return;
        }
        let mut messages = Vec::new();
        for retained in &outbound.retained {
            if retained.seq <= progress.shipped {
                continue;
            }
            if retained.position > synced {
                break;
            }
            progress.shipped = retained.seq;
            self.stats.shipped_deltas_total += 1;
            self.stats.shipped_bytes_total += retained.bytes;
            messages.push(SiteMessage::Delta(retained.record.clone()));
        }
        for message in messages {
            self.actions.push_back(Action::Send { peer, message });
        }
    }

    fn receive_resume(
        &mut self,
        from: SiteId,
        group: GroupId,
        have: Option<DeltaSeq>,
        have_epoch: Option<Epoch>,
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
        match have {
            // Its deltas after the point where the lines split are not
            // the owner's: nothing here says which regions they touched.
            _ if diverged => {
                self.marks.hit(Mark::DivergedReplicaResync);
                progress.dirty_all = true;
            }
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
            // restarted without a saved map, or the site recovered from a
            // crash mid-resync): every region.
            None if !tracked || restored => {
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
        progress.chunk_built = false;
        self.marks.hit(Mark::ResyncStarted);
        progress.shipped = last;
        progress.resync_base = last;
        if std::mem::take(&mut progress.dirty_all) {
            let region_blocks = self.config.region_blocks;
            let regions: Vec<(VolumeId, u64)> = self
                .volumes
                .iter()
                .filter(|(_, state)| state.spec.group == group)
                .flat_map(|(volume, state)| {
                    let blocks = state.spec.size / BLOCK_SIZE as u64;
                    (0..blocks.div_ceil(region_blocks)).map(move |region| (*volume, region))
                })
                .collect();
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
    fn abandon_resync(&mut self, group: GroupId, peer: SiteId) {
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
        let unacked: Vec<(VolumeId, u64)> = progress
            .resync_unacked
            .drain(..)
            .filter(|region| region.0 != VolumeId(u32::MAX))
            .collect();
        if self.config.planted_bug != Some(PlantedBug::AbandonForgetsUnacked) {
            progress.dirty.extend(unacked);
        }
        progress.dirty.extend(reading);
    }

    /// Keeps up to [`RESYNC_CHUNKS_IN_FLIGHT`] region reads and chunks
    /// going; sends the last (possibly empty) chunk when nothing is left.
    fn pump_resync(&mut self, group: GroupId, peer: SiteId) {
        loop {
            let Some(progress) = self.replication.progress_mut(group, peer) else {
                return;
            };
            if progress.state != PeerState::Resyncing {
                return;
            }
            let busy = progress.resync_reading + progress.resync_unacked.len();
            if progress.dirty.is_empty() {
                if busy == 0 {
                    self.finish_resync(group, peer);
                }
                return;
            }
            if self.resync_in_flight(peer) >= RESYNC_CHUNKS_IN_FLIGHT {
                return;
            }
            let Some(progress) = self.replication.progress_mut(group, peer) else {
                return;
            };
            let region = progress
                .dirty
                .pop_first()
                .expect("engine invariant: dirty is not empty");
            progress.resync_reading += 1;
            let generation = progress.resync_generation;
            self.start_resync_read(group, peer, region, generation);
        }
    }

    /// Region reads and chunks not yet on `peer`'s legs, all groups.
    fn resync_in_flight(&self, peer: SiteId) -> usize {
        self.replication
            .outbound
            .values()
            .filter_map(|outbound| outbound.peers.get(&peer))
            .map(|progress| progress.resync_reading + progress.resync_unacked.len())
            .sum()
    }

    /// Lets every group resyncing to `peer` use the window's free slots.
    fn pump_peer(&mut self, peer: SiteId) {
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

    fn start_resync_read(
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
    pub(super) fn mark_resync_reads_stale(&mut self, blocks: &[(BlockKey, BlockImage)]) {
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

    fn resync_read_done(
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
                None if chunk.iter().all(|byte| *byte == 0) => BlockImage::Zero,
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

    fn send_chunk(
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
    fn release_chunks(&mut self, group: GroupId, peer: SiteId) {
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

    fn finish_resync(&mut self, group: GroupId, peer: SiteId) {
        let Some(progress) = self.peer_progress(group, peer) else {
            return;
        };
        if !progress.last_chunk_sent {
            // Nothing (more) to copy: the site still needs to hear the end.
            progress.resync_unacked.push_back((VolumeId(u32::MAX), 0));
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

    fn receive_resync_ack(&mut self, from: SiteId, group: GroupId, resume: u64) {
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
        if region.0 != VolumeId(u32::MAX) {
            self.stats.resync_regions_done_total += 1;
        }
        self.pump_peer(from);
    }

    fn receive_read_request(
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
        if self.owner_of(spec.group) != self.config.site {
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

    fn receive_forward(&mut self, from: SiteId, id: u64, request: Request) {
        let volume = request.volume();
        let owned = self
            .volume(volume)
            .is_some_and(|spec| self.owner_of(spec.group) == self.config.site);
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
    pub(super) fn is_forwarded(&self, request: RequestId) -> bool {
        matches!(
            self.replication.internal.get(&request),
            Some(Internal::Forward { .. })
        )
    }

    fn new_internal(&mut self, purpose: Internal) -> RequestId {
        let request = RequestId(INTERNAL_REQUEST_BASE + self.replication.next_internal);
        self.replication.next_internal += 1;
        self.replication.internal.insert(request, purpose);
        request
    }

    /// The answer to a request the engine issued itself.
    pub(super) fn internal_reply(
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
                    Response::Data(data) => data
                        .chunks(BLOCK_SIZE)
                        .enumerate()
                        .map(|(number, chunk)| {
                            let key = BlockKey {
                                volume,
                                block: first_block + number as u64,
                            };
                            (key, BlockImage::Data(data.slice_ref(chunk)))
                        })
                        .collect(),
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
        }
    }
}

// ---------------------------------------------------------------------------
// Replica side

impl Engine {
    /// True if the group is durably marked mid-resync, and no save in
    /// flight unmarks it.
    fn marked(&self, group: GroupId) -> bool {
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
    fn hold_until_marked(&mut self, from: SiteId, message: &SiteMessage) -> bool {
        let (group, chunk) = match message {
            SiteMessage::Delta(record) => (record.group, false),
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
    pub(super) fn save_resync_marks(&mut self, starting: Option<GroupId>) {
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

    pub(super) fn send_resume(&mut self, group: GroupId) {
        // A site taking the group over refuses the stream a resume asks for.
        if self.is_taking_over(group) {
            return;
        }
        let Some(state) = self.groups.get(&group) else {
            return;
        };
        let owner = state.owner;
        let have = match self.replication.inbound.get(&group) {
            Some(inbound) if inbound.resync.is_some() => None,
            _ => Some(DeltaSeq(state.next_seq.0 - 1)),
        };
        let have_epoch = have.and(state.last_epoch);
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
            .map(|delta| DeltaSeq(delta.seq.0 - 1))
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

    /// Why a snapshot read cannot be served here now, if it cannot.
    pub(super) fn snapshot_unavailable(&self, group: GroupId) -> Option<String> {
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

    fn receive_delta(&mut self, from: SiteId, record: DeltaRecord) {
        let group_id = record.group;
        let site = self.config.site;
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
        if record.seq > expected && !gap_accepted {
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
    }

    /// True if a chunk answers a resume older than the latest one sent:
    /// the owner sent it before it heard the latest, and copies again, for
    /// the latest, whatever that older resync had not finished.
    fn stale_chunk(&self, group: GroupId, resume: u64) -> bool {
        self.replication
            .inbound
            .get(&group)
            .is_none_or(|inbound| inbound.resume != resume)
    }

    fn receive_resync(&mut self, from: SiteId, group_id: GroupId, chunk: Chunk) {
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
        // Its own deltas past `base` are overwritten: every region comes.
        group.next_seq = if first_chunk {
            DeltaSeq(base.0 + 1)
        } else {
            group.next_seq.max(DeltaSeq(base.0 + 1))
        };
        let epoch = group.epoch;
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
            let record = self.enqueue_closed(group_id, epoch, base, tag, blocks, charge, true);
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
    fn send_replica_acks(&mut self, group_id: GroupId) {
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
    pub(super) fn replica_applied(&mut self, group_id: GroupId, delta: &ClosedDelta) {
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

    fn check_consistent(&mut self, group_id: GroupId) {
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
            .any(|delta| !delta.resync && delta.seq <= resync.consistent_at);
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
    pub(super) fn submit_remote(
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
                self.stats.remote_reads_total += 1;
                // The owner answers with what changed after `have` in its
                // own history: a site mid-resync holds no delta boundary,
                // and one that kept deltas a failover discarded numbers
                // them as the new owner numbers different ones. Both need
                // the whole range.
                let diverged = self.diverged_here(spec.group);
                let have = match self.replication.inbound.get(&spec.group) {
                    Some(inbound) if inbound.resync.is_some() => None,
                    _ if diverged => None,
                    _ => Some(DeltaSeq(self.groups[&spec.group].next_seq.0 - 1)),
                };
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

    fn take_remote(&mut self, id: u64) -> Option<RemoteOp> {
        let op = self.replication.remote.remove(&id)?;
        self.replication.remote_deadlines.remove(&(op.deadline, id));
        Some(op)
    }

    fn receive_read_reply(
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
    pub(super) fn expire_remote(&mut self, now: Timestamp) {
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

pub(super) fn route_reply(
    engine: &mut Engine,
    request: RequestId,
    result: Result<Response, RequestError>,
) -> Option<Result<Response, RequestError>> {
    if is_internal(request) {
        engine.internal_reply(request, result);
        return None;
    }
    Some(result)
}

#[cfg(test)]
mod tests;
