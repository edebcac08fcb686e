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
//! - chunks are acknowledged once on the replica's legs, at most
//!   `resync_chunks_in_flight_max` in flight per site (all groups together);
//! - abandoning a resync (connection lost, or a new resume) makes every
//!   region it had not finished dirty again at once;
//! - only a streaming site (or one away after streaming) counts for
//!   flush-sync and sync durability: a site mid-resync may lack the writes
//!   of deltas it reports journaled;
//! - while a snapshot read at a replica reads its leg parts, no new delta
//!   of its group starts onto the legs (the image stays whole-delta);
//! - ids of requests sent to an owner, and of resumes, start above every
//!   id an earlier run of the site issued;
//! - a forwarded request or strict read for a group this site does not
//!   own, sent by the site it takes for the owner, waits here (at most
//!   half the remote timeout, 4096 at most) for this site to learn the
//!   change of owner: the old owner sends them on once the change is
//!   committed, and the new owner may apply it a moment later. They are
//!   served only once this site owns the group.

use super::*;

mod failover;
mod fast_drain;
mod owner;
mod replica;
mod ship_window;

use ship_window::ShipWindow;

pub use failover::EpochStart;
pub use fast_drain::{FAST_DRAIN_REGIONS_MAX, FastDrain, FastDrainProgress, SealedGroup};

/// Requests the engine issues itself (forwarded from other sites, resync
/// reads) are numbered from here; drivers number theirs below it.
const INTERNAL_REQUEST_BASE: u64 = 1 << 63;
/// Cache tags of resync chunks are numbered from here, far above any seq.
const RESYNC_TAG_BASE: u64 = 1 << 62;
/// Resync copies regions of this many blocks (1 MiB).
pub const REGION_BLOCKS: u64 = 256;
/// Most delta bytes merged into one record for a site that is behind (see
/// [`SiteMessage::Deltas`]): a record is one message, and messages stay
/// well within what the wire carries in one frame.
pub const MERGED_RECORD_BYTES_MAX: u64 = 16 << 20;
/// No volume has this id (the metadata allocates ids below it). In a
/// site's chunks not yet acknowledged, `(RESERVED_VOLUME, 0)` stands for a
/// chunk that copies no region (a resync's empty last one); in a saved map,
/// `(RESERVED_VOLUME, group)` names a group the map speaks for (this site
/// owned it when the map was saved).
const RESERVED_VOLUME: VolumeId = VolumeId(u32::MAX);
/// The unacknowledged-chunk entry of a chunk that copies no region.
const NO_REGION: (VolumeId, u64) = (RESERVED_VOLUME, 0);

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
    /// Bytes of deltas the site confirmed applied since this site began
    /// owning the group: its drain rate, sampled over time.
    pub applied_bytes_total: u64,
}

/// Replication state of one group, as seen from this site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReplication {
    pub group: GroupId,
    pub owner: SiteId,
    pub epoch: Epoch,
    /// Newest delta closed (at the owner) or received (at a replica).
    pub last_seq: DeltaSeq,
    /// Bytes of deltas closed since this site began owning the group (0 at
    /// a replica): the write rate, sampled over time.
    pub closed_bytes_total: u64,
    /// Requests (reads, writes, flushes, trims) served since this site
    /// began owning the group, by the site they came from (this one, or
    /// another that forwarded them): where the workload runs. Empty at a
    /// replica.
    pub requests_by_site: BTreeMap<SiteId, u64>,
    /// Filled at the owner: one entry per other site.
    pub peers: Vec<PeerReplication>,
    /// False at a replica whose leg is mid-resync (not at a delta boundary),
    /// or whose deltas diverged from the line its epoch history names.
    pub consistent: bool,
    /// At a replica: its leg is mid-resync (durably marked so: it stays so
    /// across a restart until the resync ends). Unlike a divergence, which
    /// a newer epoch history may clear, this only a resync ends.
    pub mid_resync: bool,
}

#[derive(Debug, Default)]
pub(super) struct Replication {
    outbound: BTreeMap<GroupId, Outbound>,
    inbound: BTreeMap<GroupId, Inbound>,
    connected: BTreeSet<SiteId>,
    remote: BTreeMap<u64, RemoteOp>,
    remote_deadlines: BTreeSet<(Timestamp, u64)>,
    /// Ids of messages this site sends to owners and expects answered
    /// (strict reads, forwarded requests, lease requests).
    pub(super) next_remote: u64,
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
    /// Groups this site owned until a failover, with the regions their
    /// lost deltas wrote, until the new owner's resync replaces them.
    lost_regions: BTreeMap<GroupId, failover::LostRegions>,
    /// The wanted set changed while a save was in flight.
    marks_stale: bool,
    /// Forwarded requests and strict reads sent here by the site this site
    /// still takes for the group's owner: it handed the group over to this
    /// site, which has not applied the change yet. Each waits, until its
    /// deadline, for this site to learn who owns the group now (see
    /// [`Engine::set_owner`]). At most [`AWAITING_OWNERSHIP_MAX`].
    awaiting_ownership: BTreeMap<GroupId, VecDeque<AwaitingOwnership>>,
    awaiting_ownership_count: usize,
    /// Fast migrations this site is the source or target of, by group.
    fast_drains: BTreeMap<GroupId, fast_drain::DrainRole>,
    /// Regions a drain logged as copied before a restart, by group and the
    /// epoch of its switchover, until [`Engine::set_fast_drain`] takes them.
    fast_drain_logged: BTreeMap<(GroupId, Epoch), BTreeSet<(VolumeId, u64)>>,
}

/// A request that reached the new owner of a group before the change of
/// owner did.
#[derive(Debug)]
struct AwaitingOwnership {
    deadline: Timestamp,
    from: SiteId,
    message: SiteMessage,
}

/// Requests all groups together may hold waiting for their change of owner
/// to apply here; past it they are refused at once.
const AWAITING_OWNERSHIP_MAX: usize = 4096;

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
    /// Bytes of the deltas closed since this run began owning the group
    /// (see [`GroupReplication::closed_bytes_total`]).
    closed_bytes: u64,
    /// See [`GroupReplication::requests_by_site`].
    requests_by_site: BTreeMap<SiteId, u64>,
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
    /// A resync of this site's line to the site began since this site
    /// owns the group (in this run). A site resuming mid-resync is then
    /// mid-way through one of those, and the map names what it still
    /// lacks; otherwise it is mid-way through another owner's (a failover
    /// or a move came in between), and holds regions of a line this site
    /// knows nothing of: every region is copied.
    resynced_here: bool,
    /// Chunks built but not sent yet, oldest first, each with the journal
    /// position the local journal must hold durably before it may leave.
    held_chunks: VecDeque<(u64, SiteMessage)>,
    /// The site's latest resume: the chunks sent for it and their acks
    /// carry it; acks of an earlier one are ignored.
    resume: u64,
    /// Bytes of the deltas it confirmed applied (see
    /// [`PeerReplication::applied_bytes_total`]).
    applied_bytes: u64,
    /// How many delta bytes may be in flight to it (streaming only).
    window: ShipWindow,
}

impl PeerProgress {
    /// Its resync's slots of the site's window: regions being read and
    /// chunks sent but not yet on the site's legs.
    fn resync_in_flight(&self) -> usize {
        self.resync_reading + self.resync_unacked.len()
    }

    /// The regions of its chunks sent but not yet acknowledged.
    fn unacked_regions(&self) -> impl Iterator<Item = (VolumeId, u64)> + '_ {
        self.resync_unacked
            .iter()
            .filter(|region| **region != NO_REGION)
            .copied()
    }

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
            resynced_here: false,
            held_chunks: VecDeque::new(),
            resume: 0,
            applied_bytes: 0,
            window: ShipWindow::default(),
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
    /// A region of a drain whose loss was accepted, read from this site's
    /// own image to be written again as a delta (see `fast_drain`).
    DrainCopy {
        group: GroupId,
        region: (VolumeId, u64),
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
        let remote = self.remote_deadlines.first().map(|(deadline, _)| *deadline);
        let awaiting = self
            .awaiting_ownership
            .values()
            .filter_map(|waiting| waiting.front())
            .map(|waiting| waiting.deadline)
            .min();
        remote.into_iter().chain(awaiting).min()
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

/// The blocks of `data`, read from `volume` from block `first_block` on.
fn blocks_read(volume: VolumeId, first_block: u64, data: &Bytes) -> Vec<(BlockKey, BlockImage)> {
    data.chunks(BLOCK_SIZE)
        .enumerate()
        .map(|(number, chunk)| {
            let key = BlockKey {
                volume,
                block: first_block + number as u64,
            };
            (key, BlockImage::Data(data.slice_ref(chunk)))
        })
        .collect()
}

fn is_internal(request: RequestId) -> bool {
    request.0 >= INTERNAL_REQUEST_BASE
}

fn region_of(key: &BlockKey, region_blocks: u64) -> (VolumeId, u64) {
    (key.volume, key.block / region_blocks)
}

impl Engine {
    /// Adds the bytes of the deltas after `before` up to `seq` to what
    /// `peer` applied of `group` (they are retained: the site held them).
    fn count_applied_bytes(
        &mut self,
        group: GroupId,
        peer: SiteId,
        before: DeltaSeq,
        seq: DeltaSeq,
    ) {
        let Some(outbound) = self.replication.outbound.get_mut(&group) else {
            return;
        };
        let first = outbound.retained.partition_point(|r| r.seq <= before);
        let bytes: u64 = outbound
            .retained
            .range(first..)
            .take_while(|r| r.seq <= seq)
            .map(|r| r.bytes)
            .sum();
        if let Some(progress) = outbound.peers.get_mut(&peer) {
            progress.applied_bytes += bytes;
        }
    }
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

impl Engine {
    /// Counts a request this site serves as `group`'s owner by the site it
    /// came from (see [`GroupReplication::requests_by_site`]): this one, or
    /// the one that forwarded it. A resync's own reads are no one's
    /// workload.
    pub(super) fn count_submitted(&mut self, group: GroupId, request: RequestId) {
        let origin = match self.replication.internal.get(&request) {
            None => self.config.site,
            Some(Internal::Forward { peer, .. }) => *peer,
            Some(
                Internal::Read { .. } | Internal::ResyncRead { .. } | Internal::DrainCopy { .. },
            ) => return,
        };
        self.count_request_from(group, origin);
    }

    /// For a read lease asked by `peer`: it streams `group`'s deltas from
    /// this site, and `have` names a delta of this site's line after which
    /// every delta is retained here (or still open).
    pub(super) fn streams_from(&self, group: GroupId, peer: SiteId, have: DeltaSeq) -> bool {
        let Some(outbound) = self.replication.outbound.get(&group) else {
            return false;
        };
        let last = DeltaSeq(self.groups[&group].next_seq.0 - 1);
        outbound.peers.get(&peer).is_some_and(|progress| {
            progress.state == PeerState::Streaming && have <= progress.shipped
        }) && have >= outbound.retired_upto
            && have <= last
    }

    /// True if a retained delta of `group` after `have` wrote a block in
    /// `first..end`.
    pub(super) fn retained_wrote_after(
        &self,
        group: GroupId,
        first: BlockKey,
        end: BlockKey,
        have: DeltaSeq,
    ) -> bool {
        self.replication
            .outbound
            .get(&group)
            .is_some_and(|outbound| {
                outbound
                    .history
                    .range(first..end)
                    .any(|(_, (seq, _))| *seq > have)
            })
    }

    pub(super) fn count_request_from(&mut self, group: GroupId, origin: SiteId) {
        if let Some(outbound) = self.replication.outbound.get_mut(&group) {
            *outbound.requests_by_site.entry(origin).or_default() += 1;
        }
    }
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
        let busy = self.group_writes_in_flight(group);
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

    /// True if a write, flush or trim of `group` is in flight here (taking
    /// its blocks, waiting for cache room, or for read leases to end).
    pub(super) fn group_writes_in_flight(&self, group: GroupId) -> bool {
        let in_group = |volume: VolumeId| {
            self.volumes
                .get(&volume)
                .is_some_and(|v| v.spec.group == group)
        };
        self.pending
            .values()
            .any(|pending| !matches!(pending, Pending::Read(_)) && in_group(pending.volume()))
            || self.throttled.iter().any(|write| in_group(write.volume))
            || self.read_leases.holds_writes_of(group)
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
        self.change_owner(group, owner, epoch);
        // Requests that came before the change are decided on it now.
        if let Some(waiting) = self.replication.awaiting_ownership.remove(&group) {
            self.replication.awaiting_ownership_count -= waiting.len();
            let now = self.now;
            for request in waiting {
                self.receive(now, request.from, request.message);
            }
        }
    }

    fn change_owner(&mut self, group: GroupId, owner: SiteId, epoch: Epoch) {
        let site = self.config.site;
        // Whichever site owns it now, a takeover begun here is over: this
        // site owns the group (from the seq it reported) or follows the
        // owner named.
        self.replication.taking_over.remove(&group);
        let previous_owner = self.groups.get(&group).map(|state| state.owner);
        let was_owner = previous_owner == Some(site);
        if previous_owner != Some(owner) || owner == site {
            // Leases held here were granted by the owner before.
            self.drop_held_read_leases(group);
        }
        if was_owner && owner != site {
            self.forget_lease_knowledge(group);
        }
        if owner == site {
            self.replication.lost_ownership.remove(&group);
            self.replication.lost_regions.remove(&group);
        } else if was_owner {
            self.lose_ownership(group, owner);
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
            if !was_owner {
                self.serve_remote_reads_here(group);
            }
            self.pump_fast_drain(group);
            self.learn_lease_knowledge(group, previous_owner.filter(|previous| *previous != site));
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
                .filter(|(_, progress)| progress.resync_in_flight() > 0)
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
        // Writes that waited for read leases to be revoked here.
        if self.read_leases.holds_writes_of(group) {
            self.release_lease_waiters();
        }
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
        self.resend_revocations(peer);
        let replicated: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, state)| state.owner == peer)
            .map(|(group, _)| *group)
            .collect();
        for group in replicated {
            self.send_resume(group);
        }
        self.fast_drains_peer_changed(peer, true);
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
        self.fast_drains_peer_changed(peer, false);
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
                SiteMessage::Delta(record) | SiteMessage::Deltas { record, .. } => record.group,
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
            SiteMessage::Delta(record) => self.receive_delta(from, record.seq, record),
            SiteMessage::Deltas { first, record } => self.receive_delta(from, first, record),
            SiteMessage::Journaled { group, seq } => {
                let now = self.now;
                if let Some(progress) = self.peer_progress(group, from) {
                    if seq > progress.shipped {
                        // Not a delta of this line (see `Applied`).
                        self.stats.refused_messages_total += 1;
                        return;
                    }
                    progress.journaled = progress.journaled.max(seq);
                    progress.window.acknowledged(progress.journaled, now);
                    self.answer_synced_waiters();
                    // The window of deltas in flight to it opened.
                    self.ship_ready(group, from);
                }
            }
            SiteMessage::Applied { group, seq } => {
                let now = self.now;
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
                    let before = progress.applied;
                    progress.applied = progress.applied.max(seq);
                    progress.journaled = progress.journaled.max(seq);
                    progress.window.acknowledged(progress.journaled, now);
                    self.count_applied_bytes(group, from, before, seq);
                    self.answer_synced_waiters();
                    self.ship_ready(group, from);
                    self.retire_shipped();
                }
            }
            SiteMessage::Resume {
                group,
                have,
                have_epoch,
                lost_regions,
                resume,
            } => self.receive_resume(from, group, have, have_epoch, lost_regions, resume),
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
            SiteMessage::ReadReply { id, result } => {
                if !self.receive_fast_drain_copy(id, &result) {
                    self.receive_read_reply(id, result);
                }
            }
            SiteMessage::Forward { id, request } => self.receive_forward(from, id, request),
            SiteMessage::LeaseRequest {
                id,
                volume,
                first_region,
                regions,
                have,
            } => self.receive_lease_request(from, id, volume, first_region, regions, have),
            SiteMessage::LeaseReply { id, lease_ms } => {
                self.receive_lease_reply(from, id, lease_ms)
            }
            SiteMessage::LeaseRevoke {
                id,
                group,
                regions,
                all,
            } => self.receive_lease_revoke(from, id, group, regions, all),
            SiteMessage::LeaseRevoked { id } => self.receive_lease_revoked(from, id),
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
    /// deltas recovery replayed (it may lack those too). A group is taken
    /// as tracked if the map names it, or if its history says no delta was
    /// written before this site's ownership (a save since then would have
    /// named it, and nothing is released without a save, so the journal
    /// still holds every delta of it). Of a group this site took over
    /// after the map was saved, the map knows nothing: it stays untracked,
    /// and a site lacking any of its deltas gets every region. Call
    /// [`Engine::set_epoch_history`] first.
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
        let mut named: BTreeSet<GroupId> = saved
            .iter()
            .filter(|(volume, _)| *volume == RESERVED_VOLUME)
            .filter_map(|(_, group)| u32::try_from(*group).ok().map(GroupId))
            .collect();
        named.extend(
            self.replication
                .outbound
                .keys()
                .filter(|group| self.owned_since_first_delta(**group))
                .copied(),
        );
        // A group the map does not name stays untracked: a site lacking
        // any of its deltas gets every region when it resumes.
        for region in saved.iter().chain(replayed) {
            let Some(group) = group_of.get(&region.0) else {
                continue;
            };
            if !named.contains(group) {
                continue;
            }
            if let Some(progress) = self.replication.progress_mut(*group, peer) {
                progress.dirty.insert(*region);
            }
        }
        for (group, outbound) in &mut self.replication.outbound {
            if !named.contains(group) {
                continue;
            }
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
        self.fast_drains_marked();
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
                                    applied_bytes_total: progress.applied_bytes,
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
                    closed_bytes_total: self
                        .replication
                        .outbound
                        .get(group)
                        .map_or(0, |outbound| outbound.closed_bytes),
                    requests_by_site: self
                        .replication
                        .outbound
                        .get(group)
                        .map(|outbound| outbound.requests_by_site.clone())
                        .unwrap_or_default(),
                    peers,
                    consistent: !self.mid_resync_here(*group) && !self.diverged_here(*group),
                    mid_resync: self.mid_resync_here(*group),
                }
            })
            .collect()
    }
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
