//! The per-node engine: volumes, consistency groups, the cache, open and
//! closed deltas, journal ordering and leg apply.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::{Bytes, BytesMut};

use crate::action::{Action, DeltaRecord, Request, RequestError, Response};
use crate::block_index::{BlockIndex, Entry};
use crate::marks::{Mark, Marks};
use crate::site_message::SiteMessage;
use crate::types::{
    BLOCK_SIZE, BlockImage, BlockKey, DeltaSeq, Epoch, GroupId, IoId, JournalPosition, Mode,
    RequestId, SiteId, Timestamp, VolumeId,
};

mod lease;
mod read_lease;
mod replication;

pub use read_lease::{READ_LEASE_IDLE_PERIODS_MAX, ReadLeaseCounters};
pub use replication::{
    EpochStart, FAST_DRAIN_REGIONS_MAX, FastDrain, FastDrainProgress, GroupReplication,
    PeerReplication, PeerState, REGION_BLOCKS, SealedGroup,
};

/// Most data bytes one delta's record holds, whatever `delta_max_bytes`
/// and the requests: a record travels to other sites in one frame (40 MiB
/// with its encoding; 32 MiB of blocks fit, see the wire's tests). A write
/// that would take the open delta past it closes the delta first, so a
/// record exceeds it only by a single write's blocks: the node's
/// configuration and the wire (forwarded writes) keep a write to 32 MiB,
/// whose blocks, unaligned, span 4 KiB more, well within the frame.
pub const DELTA_RECORD_BYTES_MAX: u64 = 32 << 20;

/// Tuning of one node's engine. Every limit names its unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// An open delta closes this long after its first write.
    pub delta_interval_ms: u64,
    /// An open delta closes once its blocks hold this many bytes.
    pub delta_max_bytes: u64,
    /// Bound on block memory: dirty deltas plus clean cached blocks. Writes
    /// wait (throttled, never dropped) while taking them would pass it.
    /// What other sites send cannot be refused: at a site that does not own
    /// every group, each owner site may add its backlog of deltas not yet
    /// applied here (see `backlog_bytes_max`) and 4 MiB of resync chunks.
    pub cache_bytes_max: u64,
    /// Once this many journal bytes are awaiting release, the legs are synced
    /// and the journal records they hold are released.
    pub journal_checkpoint_bytes: u64,
    /// The site this engine serves.
    pub site: SiteId,
    /// The other sites holding a leg of every volume; empty on a single site.
    pub peers: Vec<SiteId>,
    /// Bound on delta bytes kept for other sites until all applied them.
    /// Writes wait (throttled, never dropped) while it is passed and a
    /// connected site is behind; a disconnected site past it falls back to
    /// a resync of the regions it missed.
    pub backlog_bytes_max: u64,
    /// Longest a write waits because the backlog is full. Past it, every
    /// site holding the backlog back (connected but slower than the
    /// writes, or cut off but not yet noticed) stops being kept deltas for:
    /// what it lacks is tracked as regions and copied when it resumes. A
    /// site declared gone is folded at once, without waiting. So a slow or
    /// partitioned link never stalls the owner's writes for longer than
    /// this (plus the time to notice a dead link, which folds sooner).
    pub backlog_wait_ms_max: u64,
    /// Bound on the delta bytes shipped to one site for one group and not
    /// yet in its journal. Past it further deltas wait here, in the
    /// backlog, and leave merged (see [`crate::SiteMessage::Deltas`]) once
    /// the site acknowledges: a link slower than the writes carries each
    /// rewritten block once per shipment rather than once per delta. The
    /// window follows the link: twice the bytes the site acknowledged per
    /// round trip lately, never below `ship_window_bytes_min` nor above
    /// this. It caps the rate to one site at this many bytes per round
    /// trip, so it must exceed the link's bandwidth-delay product.
    pub ship_window_bytes_max: u64,
    /// The window before a round trip was measured (a new link, or after
    /// 10 s without acknowledgements) and its least size: what a link cut
    /// before anything was measured swallows before the cut is noticed.
    /// Clamped to `ship_window_bytes_max`.
    pub ship_window_bytes_min: u64,
    /// A strict read or forwarded request at a site that does not own the
    /// volume fails with an I/O error after this long without an answer.
    pub remote_timeout_ms: u64,
    /// Fencing (G1): when set, this site serves writes, flushes, trims and
    /// strict reads of the groups it owns only while it holds an ownership
    /// lease ([`Engine::set_lease_until`]), and never acknowledges one
    /// after its lease ran out: another site may own the group by then.
    /// Off, leases are not looked at (a single site, the simulator).
    pub leases_enforced: bool,
    /// A request that arrives while the lease is not held waits this long
    /// for a renewal before it fails with an I/O error (a lease renewal
    /// delayed by a slow metadata round trip must not fail writes).
    pub suspend_hold_ms: u64,
    /// Bound on the requests waiting for a lease; past it new ones fail at
    /// once (their memory is the client's payload, held here).
    pub suspended_requests_max: usize,
    /// Blocks per region, the unit in which a site that fell behind is
    /// resynced and in which the maps of what it lacks are saved. A node
    /// keeps [`REGION_BLOCKS`] (its saved maps name regions of that size);
    /// the simulator draws smaller ones so that its small volumes span
    /// several regions.
    pub region_blocks: u64,
    /// Region reads and chunks not yet on the other site's legs, per site
    /// being resynced (all its groups together): what a resync may add to
    /// that site's memory, and what bounds its rate (this many regions per
    /// round trip: 16 regions of 1 MiB carry 320 MiB/s at 50 ms). At least 1.
    pub resync_chunks_in_flight_max: usize,
    /// Read leases (see the `read_lease` module): how long a lease lets a
    /// site that does not own a group serve strict reads of a region from
    /// its own image, counted from when it asked. 0: no leases; every
    /// strict read there asks the owner.
    pub read_lease_ms: u64,
    /// Bound on how far any site's monotonic clock runs from real time, in
    /// millionths: a lease is cut short by it where it is held and
    /// stretched by it where it was granted.
    pub clock_drift_ppm: u64,
    /// A region whose lease an owner's write revoked is not leased again
    /// for this long: the owner is writing it.
    pub read_lease_cooldown_ms: u64,
    /// Bound on the (region, site) leases an owner tracks, and on the
    /// leases a site holds; past it no new ones are granted or taken.
    pub read_leases_max: usize,
    /// A deliberate defect, for the simulator's proof that its checker can
    /// fail. Only the simulator sets it; no configuration file can.
    pub planted_bug: Option<PlantedBug>,
}

/// Defects the simulator plants to show its checker catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Answer FLUSH before the journal sync covering it (breaks G4).
    AckFlushEarly,
    /// Apply a delta to the leg before the journal holds it durably
    /// (breaks G3 after a crash).
    ApplyBeforeJournalSync,
    /// Apply the newest ready delta of a group first (breaks G2 and G3).
    ApplyNewestFirst,
    /// Let a replica queue a received delta although its predecessor is
    /// missing (breaks G3 at the replica).
    AcceptDeltaGap,
    /// Answer a flush-sync FLUSH once the local journal holds it, without
    /// waiting for another site (breaks G4 on site loss).
    FlushSyncLocalOnly,
    /// Keep a full backlog for a site declared gone, and never give up on
    /// a lagging one: owner writes stall until the link heals (breaks the
    /// owner's write-stall bound during a partition).
    StallOnFullBacklog,
    /// Forget, when a resync stops, the regions sent but not acknowledged
    /// (breaks G6: chunks lost with the connection are never sent again).
    AbandonForgetsUnacked,
    /// Answer a strict read's diff from the delta after the first one the
    /// reader lacks (breaks G2).
    DiffSkipsFirstMissing,
    /// Save the maps of what other sites lack without the regions still
    /// to resync (breaks G6 once the owner restarts).
    MapForgetsDirty,
    /// Admit writes whether or not the cache has room (breaks the
    /// `cache_bytes_max` bound).
    CacheIgnoresBound,
    /// Answer a forwarded write whose owner did not reply in time as done
    /// (breaks G2 or G4: the write may never have reached the owner).
    ForwardTimeoutSucceeds,
    /// At an old owner whose deltas a failover discarded, name no region
    /// as written by them when resuming (breaks G6: the regions only it
    /// wrote are never copied back from the new owner).
    HealForgetsLostRegions,
    /// Serve strict reads from a read lease however long ago it was
    /// granted (breaks G2 once the owner writes past the lease's end).
    ReadLeaseNeverExpires,
    /// Acknowledge an owner write to a leased region once the revocation
    /// is sent, without waiting for it to be confirmed or to expire
    /// (breaks G2).
    ReadLeaseWriteBeforeRevoked,
    /// Forget, at a restart or a change of owner, that other sites may
    /// still hold leases granted before it (breaks G2).
    ReadLeaseForgottenOnRestart,
    /// At a fast migration's target, let writes to a region not copied yet
    /// go ahead: the copy then lands over them (breaks G2 or G4).
    FastDrainWritesUncopied,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            delta_interval_ms: 100,
            delta_max_bytes: 8 << 20,
            cache_bytes_max: 256 << 20,
            journal_checkpoint_bytes: 64 << 20,
            site: SiteId(0),
            peers: Vec::new(),
            backlog_bytes_max: 256 << 20,
            backlog_wait_ms_max: 5_000,
            ship_window_bytes_max: 32 << 20,
            ship_window_bytes_min: 1 << 20,
            remote_timeout_ms: 5_000,
            leases_enforced: false,
            suspend_hold_ms: 5_000,
            suspended_requests_max: 1024,
            region_blocks: REGION_BLOCKS,
            resync_chunks_in_flight_max: 16,
            read_lease_ms: 0,
            clock_drift_ppm: 1_000,
            read_lease_cooldown_ms: 10_000,
            read_leases_max: 1 << 20,
            planted_bug: None,
        }
    }
}

/// A volume as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Bytes; a multiple of [`BLOCK_SIZE`].
    pub size: u64,
    pub group: GroupId,
    pub mode: Mode,
}

/// Where numbering resumes after crash recovery replayed the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveredState {
    /// The next journal record gets this position (at least 1).
    pub next_position: JournalPosition,
    /// The next delta of each group gets this sequence number; groups not
    /// listed start at 1.
    pub next_seq: BTreeMap<GroupId, DeltaSeq>,
    /// Where the ids of requests sent to other sites (strict reads,
    /// forwarded writes) start. It must be above every id an earlier run of
    /// this site issued: an owner may answer a request of the previous run
    /// after the restart, and that answer must be refused, not taken for a
    /// new request that reused the id. The runtime uses the wall clock in
    /// microseconds at start (a run issues far fewer than one id per
    /// microsecond), the simulator its restart count times 2^32.
    pub next_remote_id: u64,
    /// The groups whose legs here were mid-resync, as last saved by
    /// [`Action::SaveResyncMarks`]: their images are at no delta boundary
    /// until a new resync completes, so snapshot reads are refused and the
    /// owner is asked for every region.
    pub resyncing: BTreeSet<GroupId>,
    /// The epoch of each group's newest delta (the one before `next_seq`),
    /// if the runtime knows it (its journal records carry it). A group not
    /// listed reports its epoch as unknown when it resumes, which an owner
    /// with an epoch history may take as diverged (a full resync).
    pub last_epoch: BTreeMap<GroupId, Epoch>,
}

/// Counters and gauges for metrics and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub cache_hit_blocks: u64,
    pub cache_miss_blocks: u64,
    pub dirty_bytes: u64,
    pub clean_bytes: u64,
    pub cached_blocks: u64,
    pub open_deltas: u64,
    pub closed_deltas_total: u64,
    pub applied_deltas_total: u64,
    pub unapplied_deltas: u64,
    pub journal_bytes: u64,
    pub journal_syncs_total: u64,
    pub throttled_writes_total: u64,
    pub throttled_writes_now: u64,
    pub failed: bool,
    /// Deltas sent to other sites, and the block bytes sent for them (less
    /// than theirs when merged records carried them).
    pub shipped_deltas_total: u64,
    pub shipped_bytes_total: u64,
    /// Of the deltas sent, those that went merged with others into one
    /// record (see [`crate::SiteMessage::Deltas`]).
    pub merged_deltas_total: u64,
    /// Deltas received from owners at other sites.
    pub received_deltas_total: u64,
    pub received_bytes_total: u64,
    /// Delta bytes kept until every site applied them.
    pub backlog_bytes: u64,
    pub backlog_deltas: u64,
    /// Writes that waited because the backlog was full.
    pub backlog_throttled_total: u64,
    /// Sites no longer kept deltas for because writes waited on them past
    /// `backlog_wait_ms_max`, or because they were declared gone while the
    /// backlog was full (each then resyncs by region).
    pub backlog_folds_total: u64,
    /// Strict reads sent to an owner, and forwarded requests.
    pub remote_reads_total: u64,
    pub forwarded_total: u64,
    pub remote_timeouts_total: u64,
    /// Strict reads sent to an owner that this site then took the group
    /// over from, served here instead.
    pub remote_reads_served_here_total: u64,
    /// Resync: regions still to copy to other sites, and copied so far.
    pub resync_regions_left: u64,
    pub resync_regions_done_total: u64,
    /// Messages from other sites refused (wrong owner, unknown id).
    pub refused_messages_total: u64,
    /// Regions a fast migration's target never copied from its source
    /// because an operator accepted their loss.
    pub fast_drain_regions_lost_total: u64,
    /// Requests waiting for an ownership lease now, and those that failed
    /// waiting (held past `suspend_hold_ms`, or past the bound).
    pub suspended_requests_now: u64,
    pub suspended_failed_total: u64,
    /// Successful answers turned into I/O errors because the lease ran out
    /// before they left (G1).
    pub lease_expired_replies_total: u64,
    /// Deltas this site acknowledged as owner that another site's takeover
    /// started before (lost to the cluster), and the bytes of those still
    /// retained here when ownership moved (a lower bound).
    pub failover_lost_deltas_total: u64,
    pub failover_lost_bytes_total: u64,
}

/// The node's protocol state machine. See the crate docs for the ordering
/// rules it enforces.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    volumes: BTreeMap<VolumeId, VolumeState>,
    groups: BTreeMap<GroupId, Group>,
    index: BlockIndex,
    pending: BTreeMap<RequestId, Pending>,
    ios: BTreeMap<IoId, IoPurpose>,
    next_io: u64,
    /// Writes admitted before all throttled ones would jump the queue.
    throttled: VecDeque<WriteRequest>,
    /// Bytes promised to admitted writes still waiting for leg reads.
    reserved_bytes: u64,
    dirty_bytes: u64,
    deadlines: BTreeSet<(Timestamp, GroupId)>,
    journal: JournalState,
    replication: replication::Replication,
    lease: lease::Lease,
    read_leases: read_lease::ReadLeases,
    failed: Option<String>,
    draining: bool,
    now: Timestamp,
    /// The engine was told the time at least once (its clock at start is
    /// unknown until then: a restarted runtime's clock may start anywhere).
    clock_seen: bool,
    stats: EngineStats,
    marks: Marks,
    actions: VecDeque<Action>,
}

impl Engine {
    pub fn new(config: EngineConfig, recovered: RecoveredState) -> Self {
        assert!(
            config.delta_max_bytes > 0 && config.cache_bytes_max >= 2 * config.delta_max_bytes,
            "engine config invariant: cache_bytes_max must hold two full deltas"
        );
        assert!(
            config.delta_max_bytes <= DELTA_RECORD_BYTES_MAX,
            "engine config invariant: delta_max_bytes is at most DELTA_RECORD_BYTES_MAX"
        );
        assert!(
            config.resync_chunks_in_flight_max >= 1,
            "engine config invariant: a resync keeps at least one chunk going"
        );
        let next_position = recovered.next_position.0.max(1);
        let groups = recovered
            .next_seq
            .iter()
            .map(|(group, seq)| {
                let mut state = Group::new(*seq, config.site);
                if seq.0 > 1 {
                    state.last_epoch = recovered.last_epoch.get(group).copied();
                }
                (*group, state)
            })
            .collect();
        Engine {
            config,
            volumes: BTreeMap::new(),
            groups,
            index: BlockIndex::default(),
            pending: BTreeMap::new(),
            ios: BTreeMap::new(),
            next_io: 1,
            throttled: VecDeque::new(),
            reserved_bytes: 0,
            dirty_bytes: 0,
            deadlines: BTreeSet::new(),
            journal: JournalState {
                next_position,
                synced_upto: next_position - 1,
                sync_in_flight: false,
                unapplied: BTreeSet::new(),
                unreleased: VecDeque::new(),
                unreleased_bytes: 0,
                released_upto: next_position - 1,
                leg_sync_in_flight: None,
                touched_volumes: BTreeSet::new(),
            },
            replication: replication::Replication::recovered(
                recovered.next_remote_id,
                &recovered.resyncing,
            ),
            lease: lease::Lease::default(),
            read_leases: read_lease::ReadLeases::default(),
            failed: None,
            draining: false,
            now: Timestamp(0),
            clock_seen: false,
            stats: EngineStats::default(),
            marks: Marks::default(),
            actions: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Serves `volume` from now on. Its leg must exist.
    pub fn add_volume(&mut self, volume: VolumeId, spec: VolumeSpec) {
        assert!(
            spec.size.is_multiple_of(BLOCK_SIZE as u64),
            "volume {volume} size {} is not a multiple of the block size",
            spec.size
        );
        let site = self.config.site;
        self.groups
            .entry(spec.group)
            .or_insert_with(|| Group::new(DeltaSeq(1), site));
        self.volumes.insert(volume, VolumeState { spec });
    }

    /// Stops serving `volume` and forgets its cached blocks. Refused while
    /// requests on it are in flight; its blocks still queued in deltas are
    /// left out when those deltas reach the legs.
    pub fn remove_volume(&mut self, volume: VolumeId) -> Result<(), RequestError> {
        if !self.volumes.contains_key(&volume) {
            return Err(RequestError::NoVolume(volume));
        }
        let busy = self
            .pending
            .values()
            .any(|pending| pending.volume() == volume)
            || self.throttled.iter().any(|write| write.volume == volume)
            || self.lease.holds_volume(volume);
        if busy {
            return Err(RequestError::Io(format!(
                "volume {volume} has requests in flight"
            )));
        }
        self.volumes.remove(&volume);
        self.index.remove_where(|key| key.volume == volume);
        Ok(())
    }

    pub fn volume(&self, volume: VolumeId) -> Option<VolumeSpec> {
        self.volumes.get(&volume).map(|state| state.spec)
    }

    /// Takes a client request; its answer comes as an [`Action::Reply`].
    pub fn submit(&mut self, now: Timestamp, request_id: RequestId, request: Request) {
        self.observe(now);
        let volume = request.volume();
        let Some(spec) = self.volume(volume) else {
            self.reply(request_id, Err(RequestError::NoVolume(volume)));
            return;
        };
        let is_read = matches!(request, Request::Read { .. } | Request::ReadSnapshot { .. });
        if self.owner_of(spec.group) != self.config.site
            && !matches!(request, Request::ReadSnapshot { .. })
        {
            self.submit_remote(request_id, &spec, request);
            return;
        }
        let Some(request) = self.gate_on_lease(request_id, request) else {
            return;
        };
        self.count_submitted(spec.group, request_id);
        if !is_read && self.replication.is_handing_over(spec.group) {
            // Held until the new owner takes over (then forwarded to it) or
            // the hand-over is called off (then served here).
            self.replication.hold(spec.group, request_id, request);
            return;
        }
        if self.fast_drain_gate(request_id, &request, spec.group) {
            return;
        }
        let Some(request) = self.gate_on_read_leases(request_id, request, spec.group) else {
            return;
        };
        self.start_request(request_id, request, spec);
    }

    /// Starts a request of a group this site owns (or a read) that passed
    /// every gate.
    fn start_request(&mut self, request_id: RequestId, request: Request, spec: VolumeSpec) {
        let volume = request.volume();
        match request {
            Request::Read { offset, length, .. } | Request::ReadSnapshot { offset, length, .. } => {
                if let Err(error) = check_range(&spec, offset, length) {
                    self.reply(request_id, Err(error));
                    return;
                }
                if let Some(reason) = self.snapshot_unavailable(spec.group) {
                    self.reply(request_id, Err(RequestError::Io(reason)));
                    return;
                }
                let snapshot = matches!(request, Request::ReadSnapshot { .. })
                    && self.owner_of(spec.group) != self.config.site;
                self.start_read(request_id, volume, offset, length, None);
                if snapshot && let Some(Pending::Read(read)) = self.pending.get_mut(&request_id) {
                    // Whole-delta image: deltas wait until its leg parts
                    // are read (see `try_apply`).
                    read.snapshot_of = Some(spec.group);
                }
            }
            Request::Write {
                offset, data, fua, ..
            } => {
                let length = data.len() as u64;
                self.start_write(
                    WriteRequest {
                        request: request_id,
                        volume,
                        offset,
                        payload: Payload::Data(data),
                        fua,
                        arrived: self.now,
                    },
                    &spec,
                    length,
                );
            }
            Request::WriteZeroes {
                offset,
                length,
                fua,
                ..
            } => {
                self.start_write(
                    WriteRequest {
                        request: request_id,
                        volume,
                        offset,
                        payload: Payload::Zero(length),
                        fua,
                        arrived: self.now,
                    },
                    &spec,
                    length,
                );
            }
            Request::Trim { offset, length, .. } => {
                // A trim is a hint (NBD allows old data or zeros afterwards);
                // the leg keeps its blocks, so nothing can be lost by it.
                let result = check_range(&spec, offset, length).map(|()| Response::Done);
                self.reply(request_id, result);
            }
            Request::Flush { .. } => {
                if let Some(reason) = &self.failed {
                    let error = RequestError::Failed(reason.clone());
                    self.reply(request_id, Err(error));
                    return;
                }
                self.close_delta(spec.group);
                if self.config.planted_bug == Some(PlantedBug::AckFlushEarly) {
                    self.reply(request_id, Ok(Response::Done));
                    return;
                }
                self.wait_for_journal(request_id, volume, spec.group, spec.mode);
            }
        }
    }

    /// The answer to an [`Action::ReadLeg`].
    pub fn leg_read_done(&mut self, io: IoId, result: Result<Bytes, String>) {
        let Some(purpose) = self.ios.remove(&io) else {
            panic!("engine invariant: leg read {io} answered twice or never issued");
        };
        match purpose {
            IoPurpose::ReadPart { request, part } => self.read_part_done(request, part, result),
            IoPurpose::Fill { request, key } => self.fill_done(request, key, result),
            other => panic!("engine invariant: io {io} is {other:?}, not a leg read"),
        }
    }

    /// The answer to an [`Action::SyncJournal`].
    pub fn journal_synced(&mut self, io: IoId, result: Result<(), String>) {
        let Some(IoPurpose::JournalSync { upto }) = self.ios.remove(&io) else {
            panic!("engine invariant: io {io} is not a journal sync in flight");
        };
        self.journal.sync_in_flight = false;
        self.stats.journal_syncs_total += 1;
        if let Err(reason) = result {
            self.fail(format!("journal sync failed: {reason}"));
            return;
        }
        self.journal.synced_upto = upto.0;
        self.answer_synced_waiters();
        let groups: Vec<GroupId> = self.groups.keys().copied().collect();
        for group in groups {
            self.try_apply(group);
        }
        self.after_journal_sync();
        self.fast_drains_after_sync();
        self.maybe_sync_journal();
    }

    /// A journal append failed: nothing after it can be made durable.
    pub fn journal_failed(&mut self, reason: String) {
        self.fail(format!("journal append failed: {reason}"));
    }

    /// The answer to an [`Action::WriteLeg`].
    pub fn leg_written(&mut self, io: IoId, result: Result<(), String>) {
        let Some(IoPurpose::LegWrite { group }) = self.ios.remove(&io) else {
            panic!("engine invariant: io {io} is not a leg write in flight");
        };
        if let Err(reason) = result {
            self.fail(format!("leg write failed: {reason}"));
            return;
        }
        let state = self
            .groups
            .get_mut(&group)
            .expect("engine invariant: a group with a leg write in flight exists");
        let position = state
            .applying
            .take()
            .expect("engine invariant: a group with a leg write in flight records which");
        let index = state
            .closed
            .iter()
            .position(|delta| delta.position.0 == position)
            .expect("engine invariant: the delta being applied is queued");
        let delta = state
            .closed
            .remove(index)
            .expect("engine invariant: index is in range");
        for (key, _) in &delta.blocks {
            self.index.mark_applied(*key, delta.tag);
            self.journal.touched_volumes.insert(key.volume);
        }
        self.replica_applied(group, &delta);
        self.dirty_bytes -= delta.charge;
        self.journal.unapplied.remove(&delta.position.0);
        self.stats.applied_deltas_total += 1;
        self.try_apply(group);
        self.admit_throttled();
        self.pump_fast_drains();
        self.maybe_checkpoint();
    }

    /// The answer to an [`Action::SyncLegs`].
    pub fn legs_synced(&mut self, io: IoId, result: Result<(), String>) {
        let Some(IoPurpose::LegSync { upto }) = self.ios.remove(&io) else {
            panic!("engine invariant: io {io} is not a leg sync in flight");
        };
        if let Err(reason) = result {
            self.journal.leg_sync_in_flight = None;
            self.fail(format!("leg sync failed: {reason}"));
            return;
        }
        // Other sites' maps first: a released record must be in the journal
        // of every site or in the saved map of the sites that lack it.
        let saves = self.save_dirty_maps(upto);
        if saves > 0 {
            self.replication.release_waiting = Some((upto, saves));
            return;
        }
        self.finish_release(upto);
    }

    /// The answer to an [`Action::SaveDirtyMap`].
    pub fn dirty_map_saved(&mut self, io: IoId, result: Result<(), String>) {
        let Some(IoPurpose::MapSave) = self.ios.remove(&io) else {
            panic!("engine invariant: io {io} is not a dirty-map save in flight");
        };
        if let Err(reason) = result {
            self.journal.leg_sync_in_flight = None;
            self.fail(format!("saving a dirty-region map failed: {reason}"));
            return;
        }
        let Some((upto, saves)) = self.replication.release_waiting.take() else {
            panic!("engine invariant: a map save answers a release that waits");
        };
        if saves > 1 {
            self.replication.release_waiting = Some((upto, saves - 1));
            return;
        }
        self.finish_release(upto);
    }

    fn finish_release(&mut self, upto: u64) {
        self.journal.leg_sync_in_flight = None;
        while let Some((position, bytes)) = self.journal.unreleased.front().copied() {
            if position > upto {
                break;
            }
            self.journal.unreleased.pop_front();
            self.journal.unreleased_bytes -= bytes;
        }
        self.journal.released_upto = upto;
        self.actions.push_back(Action::ReleaseJournal {
            upto: JournalPosition(upto),
        });
        self.maybe_checkpoint();
    }

    /// When the engine next needs [`Engine::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let delta = self.deadlines.first().map(|(deadline, _)| *deadline);
        let remote = self.replication.next_deadline();
        let backlog = self
            .replication
            .backlog_wait_since
            .map(|since| since.saturating_add_millis(self.config.backlog_wait_ms_max));
        let suspended = self.lease.next_deadline();
        let read_leases = self.read_leases.next_deadline();
        let fast_drains = self.fast_drain_deadline();
        [delta, remote, backlog, suspended, read_leases, fast_drains]
            .into_iter()
            .flatten()
            .min()
    }

    /// Closes every open delta whose interval ran out by `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.observe(now);
        while let Some((deadline, group)) = self.deadlines.first().copied() {
            if deadline > now {
                break;
            }
            self.close_delta(group);
        }
        self.expire_remote(now);
        self.expire_awaiting_ownership(now);
        self.check_backlog_wait(now);
        self.expire_suspended(now);
        self.handle_read_lease_timeout(now);
        self.expire_fast_drains(now);
    }

    /// Closes every open delta and releases the whole journal once it is on
    /// synced legs; see [`Engine::is_drained`].
    pub fn start_drain(&mut self) {
        self.draining = true;
        let groups: Vec<GroupId> = self.groups.keys().copied().collect();
        for group in groups {
            self.close_delta(group);
        }
        self.maybe_checkpoint();
    }

    /// True once nothing is in flight and every journal record is released.
    pub fn is_drained(&self) -> bool {
        self.ios.is_empty()
            && self.pending.is_empty()
            && self.throttled.is_empty()
            && self.lease.is_idle()
            && self.read_leases.is_idle()
            && self.groups.values().all(|group| group.is_idle())
            && self.journal.released_upto + 1 == self.journal.next_position
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn stats(&self) -> EngineStats {
        let mut stats = self.stats.clone();
        stats.dirty_bytes = self.dirty_bytes;
        stats.clean_bytes = self.index.clean_bytes();
        stats.cached_blocks = self.index.len() as u64;
        stats.open_deltas = self
            .groups
            .values()
            .filter(|group| !group.open.blocks.is_empty())
            .count() as u64;
        stats.unapplied_deltas = self.journal.unapplied.len() as u64;
        stats.journal_bytes = self.journal.unreleased_bytes;
        stats.throttled_writes_now = self.throttled.len() as u64;
        stats.failed = self.failed.is_some();
        stats.suspended_requests_now = self.lease.suspended_count() as u64;
        self.replication.fill_stats(&mut stats);
        stats
    }

    /// Bytes the block cache holds, dirty and clean: `stats()`'s
    /// `dirty_bytes + clean_bytes` without building the rest (the
    /// simulator checks the cache's bound after every event).
    pub fn cache_bytes(&self) -> u64 {
        self.dirty_bytes + self.index.clean_bytes()
    }

    /// How often each protocol decision was taken (for the simulator's
    /// coverage report).
    pub fn marks(&self) -> &Marks {
        &self.marks
    }

    /// The newest image of a block held in memory, if any (for checkers).
    pub fn cached_block(&self, key: &BlockKey) -> Option<&BlockImage> {
        self.index.get(key).map(|entry| &entry.image)
    }

    /// Why the node stopped taking writes, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }
}

// ---------------------------------------------------------------------------
// Internal state

#[derive(Debug)]
struct VolumeState {
    spec: VolumeSpec,
}

#[derive(Debug)]
struct Group {
    /// The site accepting writes for the group's volumes.
    owner: SiteId,
    epoch: Epoch,
    /// Sequence number of the open delta (the next one to close).
    next_seq: DeltaSeq,
    /// The epoch delta `next_seq - 1` was written under, if known: an
    /// owner's epoch history tells from it whether this site's image is
    /// on the owner's line of deltas.
    last_epoch: Option<Epoch>,
    open: OpenDelta,
    /// Closed deltas not yet on the leg, oldest first.
    closed: VecDeque<ClosedDelta>,
    /// Journal position of the delta whose leg write is in flight.
    applying: Option<u64>,
    /// Position of the newest closed delta: a flush waits for it.
    last_position: u64,
}

impl Group {
    fn new(next_seq: DeltaSeq, owner: SiteId) -> Self {
        Group {
            owner,
            epoch: Epoch(1),
            next_seq,
            last_epoch: None,
            open: OpenDelta::default(),
            closed: VecDeque::new(),
            applying: None,
            last_position: 0,
        }
    }

    fn is_idle(&self) -> bool {
        self.open.blocks.is_empty() && self.closed.is_empty() && self.applying.is_none()
    }
}

#[derive(Debug, Default)]
struct OpenDelta {
    blocks: BTreeMap<BlockKey, BlockImage>,
    /// Memory charged for `blocks`.
    charge: u64,
    /// Data bytes, compared with `delta_max_bytes`.
    data_bytes: u64,
    deadline: Option<Timestamp>,
}

#[derive(Debug)]
struct ClosedDelta {
    position: JournalPosition,
    seq: DeltaSeq,
    /// The first delta it covers: `seq` itself, unless it is a record of
    /// several deltas merged (see [`crate::SiteMessage::Deltas`]). Until it
    /// is on the legs, no delta from `first` on is.
    first: DeltaSeq,
    /// What the cache marks this delta's dirty blocks with: the seq for a
    /// delta, a private value for a resync chunk (which has no seq).
    tag: DeltaSeq,
    /// A resync chunk received from the owner, not a delta.
    resync: bool,
    blocks: Vec<(BlockKey, BlockImage)>,
    charge: u64,
}

#[derive(Debug)]
struct JournalState {
    next_position: u64,
    synced_upto: u64,
    sync_in_flight: bool,
    /// Positions of journaled deltas not yet on their leg.
    unapplied: BTreeSet<u64>,
    /// (position, bytes) of records not yet released, in order.
    unreleased: VecDeque<(u64, u64)>,
    unreleased_bytes: u64,
    released_upto: u64,
    leg_sync_in_flight: Option<u64>,
    /// Volumes written to legs since the last leg sync.
    touched_volumes: BTreeSet<VolumeId>,
}

#[derive(Debug)]
enum IoPurpose {
    ReadPart { request: RequestId, part: usize },
    Fill { request: RequestId, key: BlockKey },
    JournalSync { upto: JournalPosition },
    LegWrite { group: GroupId },
    LegSync { upto: u64 },
    MapSave,
    MarksSave,
    DrainLog { group: GroupId },
}

#[derive(Debug, Clone)]
enum Payload {
    Data(Bytes),
    Zero(u64),
}

impl Payload {
    fn len(&self) -> u64 {
        match self {
            Payload::Data(data) => data.len() as u64,
            Payload::Zero(length) => *length,
        }
    }
}

#[derive(Debug)]
struct WriteRequest {
    request: RequestId,
    volume: VolumeId,
    offset: u64,
    payload: Payload,
    fua: bool,
    /// When it was submitted: a write waiting on a full backlog counts its
    /// wait from here (see `admit_throttled`).
    arrived: Timestamp,
}

#[derive(Debug)]
enum Pending {
    Read(PendingRead),
    /// Admitted, waiting for leg reads of partially covered blocks.
    Write {
        write: WriteRequest,
        outstanding_fills: u32,
        reserved: u64,
        failed: Option<String>,
    },
    /// Waiting for the journal to be synced up to `upto` and, outside
    /// async mode, for another site's journal to hold delta `peer_seq`.
    Durable {
        volume: VolumeId,
        upto: u64,
        peer_seq: Option<(GroupId, DeltaSeq)>,
    },
}

impl Pending {
    fn volume(&self) -> VolumeId {
        match self {
            Pending::Read(read) => read.volume,
            Pending::Write { write, .. } => write.volume,
            Pending::Durable { volume, .. } => *volume,
        }
    }
}

#[derive(Debug)]
struct PendingRead {
    volume: VolumeId,
    length: usize,
    parts: Vec<ReadPart>,
    outstanding: u32,
    failed: Option<String>,
    /// A snapshot read at a site that does not own the volume: no delta of
    /// this group may start onto the legs while its leg parts are read,
    /// or they could show a delta its cached parts (taken at the start)
    /// do not.
    snapshot_of: Option<GroupId>,
}

#[derive(Debug)]
struct ReadPart {
    /// Where this part lands in the reply.
    out_offset: usize,
    length: usize,
    source: ReadSource,
}

#[derive(Debug)]
enum ReadSource {
    Memory { image: BlockImage, from: usize },
    Leg(Option<Bytes>),
}

fn check_range(spec: &VolumeSpec, offset: u64, length: u64) -> Result<(), RequestError> {
    match offset.checked_add(length) {
        Some(end) if end <= spec.size => Ok(()),
        _ => Err(RequestError::OutOfRange {
            offset,
            length,
            size: spec.size,
        }),
    }
}

fn block_span(offset: u64, length: u64) -> std::ops::RangeInclusive<u64> {
    let block = BLOCK_SIZE as u64;
    (offset / block)..=((offset + length - 1) / block)
}

// ---------------------------------------------------------------------------
// Reads

impl Engine {
    /// Reads from the cache and the leg; blocks in `overlay` (newer ones an
    /// owner sent) win over both.
    fn start_read(
        &mut self,
        request: RequestId,
        volume: VolumeId,
        offset: u64,
        length: u64,
        overlay: Option<&BTreeMap<u64, BlockImage>>,
    ) {
        if length == 0 {
            self.reply(request, Ok(Response::Data(Bytes::new())));
            return;
        }
        let block_bytes = BLOCK_SIZE as u64;
        let end = offset + length;
        let mut parts: Vec<ReadPart> = Vec::new();
        for block in block_span(offset, length) {
            let block_start = block * block_bytes;
            let from = offset.max(block_start);
            let to = end.min(block_start + block_bytes);
            let out_offset = (from - offset) as usize;
            let part_length = (to - from) as usize;
            let key = BlockKey { volume, block };
            let newer = overlay.and_then(|overlay| overlay.get(&block));
            match newer.or_else(|| self.index.get(&key).map(|entry| &entry.image)) {
                Some(image) => {
                    self.stats.cache_hit_blocks += 1;
                    parts.push(ReadPart {
                        out_offset,
                        length: part_length,
                        source: ReadSource::Memory {
                            image: image.clone(),
                            from: (from - block_start) as usize,
                        },
                    });
                }
                None => {
                    self.stats.cache_miss_blocks += 1;
                    // Runs of missing blocks become one leg read.
                    if let Some(last) = parts.last_mut()
                        && matches!(last.source, ReadSource::Leg(_))
                        && last.out_offset + last.length == out_offset
                    {
                        last.length += part_length;
                        continue;
                    }
                    parts.push(ReadPart {
                        out_offset,
                        length: part_length,
                        source: ReadSource::Leg(None),
                    });
                }
            }
        }
        let mut outstanding = 0;
        for (index, part) in parts.iter().enumerate() {
            if !matches!(part.source, ReadSource::Leg(_)) {
                continue;
            }
            outstanding += 1;
            let io = self.new_io(IoPurpose::ReadPart {
                request,
                part: index,
            });
            self.actions.push_back(Action::ReadLeg {
                io,
                volume,
                offset: offset + part.out_offset as u64,
                length: part.length as u64,
            });
        }
        let read = PendingRead {
            volume,
            length: length as usize,
            parts,
            outstanding,
            failed: None,
            snapshot_of: None,
        };
        if outstanding == 0 {
            self.finish_read(request, read);
            return;
        }
        self.pending.insert(request, Pending::Read(read));
    }

    fn read_part_done(&mut self, request: RequestId, part: usize, result: Result<Bytes, String>) {
        let Some(Pending::Read(read)) = self.pending.get_mut(&request) else {
            panic!("engine invariant: read part for request {request} without a pending read");
        };
        read.outstanding -= 1;
        match result {
            Ok(data) if data.len() == read.parts[part].length => {
                read.parts[part].source = ReadSource::Leg(Some(data));
            }
            Ok(data) => {
                read.failed = Some(format!(
                    "short leg read: {} of {} bytes",
                    data.len(),
                    read.parts[part].length
                ));
            }
            Err(reason) => read.failed = Some(reason),
        }
        if read.outstanding > 0 {
            return;
        }
        let Some(Pending::Read(read)) = self.pending.remove(&request) else {
            unreachable!("checked above");
        };
        let snapshot_of = read.snapshot_of;
        self.finish_read(request, read);
        if let Some(group) = snapshot_of {
            self.try_apply(group);
        }
    }

    fn finish_read(&mut self, request: RequestId, mut read: PendingRead) {
        if let Some(reason) = read.failed {
            self.reply(request, Err(RequestError::Io(reason)));
            return;
        }
        // One leg read covering the whole request: hand its buffer on as is.
        if read.parts.len() == 1
            && let ReadSource::Leg(Some(data)) = &mut read.parts[0].source
        {
            let data = std::mem::take(data);
            self.reply(request, Ok(Response::Data(data)));
            return;
        }
        let mut out = BytesMut::zeroed(read.length);
        for part in &read.parts {
            let target = &mut out[part.out_offset..part.out_offset + part.length];
            match &part.source {
                ReadSource::Memory { image, from } => image.copy_range(*from, target),
                ReadSource::Leg(Some(data)) => target.copy_from_slice(data),
                ReadSource::Leg(None) => {
                    panic!("engine invariant: read {request} finished with a leg part missing")
                }
            }
        }
        self.reply(request, Ok(Response::Data(out.freeze())));
    }
}

// ---------------------------------------------------------------------------
// Writes

impl Engine {
    fn start_write(&mut self, write: WriteRequest, spec: &VolumeSpec, length: u64) {
        if let Err(error) = check_range(spec, write.offset, length) {
            self.reply(write.request, Err(error));
            return;
        }
        if let Some(reason) = &self.failed {
            let error = RequestError::Failed(reason.clone());
            self.reply(write.request, Err(error));
            return;
        }
        if length == 0 {
            self.finish_write_ack(write.request, write.volume, spec.group, write.fua);
            return;
        }
        if self.backlog_full() {
            self.stats.backlog_throttled_total += 1;
            self.marks.hit(Mark::BacklogThrottled);
            self.stats.throttled_writes_total += 1;
            self.throttled.push_back(write);
            self.replication.backlog_wait_since.get_or_insert(self.now);
            return;
        }
        let charge = write_charge(write.offset, &write.payload);
        // Half the cache: a write that large could never be admitted next
        // to a full delta being drained.
        if charge > self.config.cache_bytes_max / 2 {
            let error = RequestError::TooLarge {
                length,
                cache_bytes_max: self.config.cache_bytes_max,
            };
            self.reply(write.request, Err(error));
            return;
        }
        if !self.throttled.is_empty() || !self.make_room(charge) {
            self.marks.hit(Mark::CacheThrottled);
            self.stats.throttled_writes_total += 1;
            self.throttled.push_back(write);
            self.relieve_pressure();
            return;
        }
        self.admit(write, charge);
    }

    /// True if `charge` more bytes fit the cache, evicting clean blocks if
    /// needed.
    fn make_room(&mut self, charge: u64) -> bool {
        let used = self.dirty_bytes + self.index.clean_bytes() + self.reserved_bytes;
        let limit = self.config.cache_bytes_max;
        if used + charge <= limit || self.config.planted_bug == Some(PlantedBug::CacheIgnoresBound)
        {
            return true;
        }
        let needed = used + charge - limit;
        self.index.evict(needed) >= needed
    }

    /// Dirty data only leaves memory once its delta is closed, journaled and
    /// applied: under pressure, close the open deltas now.
    fn relieve_pressure(&mut self) {
        let groups: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|(_, group)| !group.open.blocks.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for group in groups {
            self.close_delta(group);
        }
    }

    fn admit_throttled(&mut self) {
        self.admit_throttled_writes();
        // The backlog wait runs while a write waits on a full backlog, from
        // when the oldest waiting write arrived (the queue is in arrival
        // order). Writes admitted ahead of it, whose deltas filled the
        // backlog again, do not restart its clock, nor stop it: it would
        // then wait for the slow site's next acknowledgement, however late.
        self.replication.backlog_wait_since = match self.throttled.front() {
            Some(front) if self.backlog_full() => Some(front.arrived),
            _ => None,
        };
    }

    fn admit_throttled_writes(&mut self) {
        while let Some(front) = self.throttled.front() {
            if self.backlog_full() {
                return;
            }
            let charge = write_charge(front.offset, &front.payload);
            if !self.make_room(charge) {
                self.relieve_pressure();
                return;
            }
            let write = self
                .throttled
                .pop_front()
                .expect("engine invariant: front exists");
            if !self.volumes.contains_key(&write.volume) {
                self.reply(write.request, Err(RequestError::NoVolume(write.volume)));
                continue;
            }
            self.admit(write, charge);
        }
    }

    /// Reserves memory and fetches the partially covered edge blocks that are
    /// not resident, then merges.
    fn admit(&mut self, write: WriteRequest, charge: u64) {
        self.reserved_bytes += charge;
        let length = write.payload.len();
        let mut fills = Vec::new();
        for key in partial_blocks(write.volume, write.offset, length) {
            if !self.index.pin(&key) {
                fills.push(key);
            }
        }
        if fills.is_empty() {
            self.accept(write, charge);
            return;
        }
        let request = write.request;
        for key in &fills {
            let io = self.new_io(IoPurpose::Fill { request, key: *key });
            self.actions.push_back(Action::ReadLeg {
                io,
                volume: key.volume,
                offset: key.block * BLOCK_SIZE as u64,
                length: BLOCK_SIZE as u64,
            });
        }
        self.pending.insert(
            request,
            Pending::Write {
                write,
                outstanding_fills: fills.len() as u32,
                reserved: charge,
                failed: None,
            },
        );
    }

    fn fill_done(&mut self, request: RequestId, key: BlockKey, result: Result<Bytes, String>) {
        let Some(Pending::Write {
            outstanding_fills,
            failed,
            ..
        }) = self.pending.get_mut(&request)
        else {
            panic!("engine invariant: fill for request {request} without a pending write");
        };
        *outstanding_fills -= 1;
        match result {
            Ok(data) if data.len() == BLOCK_SIZE => {
                // If a write made the block resident meanwhile, its image is
                // newer than what the leg returned and is kept.
                self.index.insert_clean_pinned(key, BlockImage::Data(data));
            }
            Ok(data) => *failed = Some(format!("short leg read: {} bytes", data.len())),
            Err(reason) => *failed = Some(reason),
        }
        let Some(Pending::Write {
            outstanding_fills: 0,
            ..
        }) = self.pending.get(&request)
        else {
            return;
        };
        let Some(Pending::Write {
            write,
            reserved,
            failed,
            ..
        }) = self.pending.remove(&request)
        else {
            unreachable!("checked above");
        };
        if let Some(reason) = failed {
            for key in partial_blocks(write.volume, write.offset, write.payload.len()) {
                self.index.unpin(&key);
            }
            self.reserved_bytes -= reserved;
            self.reply(request, Err(RequestError::Io(reason)));
            self.admit_throttled();
            return;
        }
        self.accept(write, reserved);
    }

    /// Puts the write's blocks into the open delta of its group, merging
    /// partial blocks into their resident (pinned) images, then acknowledges
    /// it (or, with FUA, waits for the journal).
    fn accept(&mut self, write: WriteRequest, reserved: u64) {
        self.reserved_bytes -= reserved;
        let Some(spec) = self.volume(write.volume) else {
            self.reply(write.request, Err(RequestError::NoVolume(write.volume)));
            return;
        };
        let group_id = spec.group;
        let block_bytes = BLOCK_SIZE as u64;
        let length = write.payload.len();
        let end = write.offset + length;
        // A large write after others could take the open delta past what
        // one frame carries: it starts a delta of its own.
        let new_bytes = block_span(write.offset, length).count() as u64 * block_bytes;
        let open_bytes = self.groups[&group_id].open.data_bytes;
        if open_bytes > 0 && open_bytes + new_bytes > DELTA_RECORD_BYTES_MAX {
            self.close_delta(group_id);
        }
        for block in block_span(write.offset, length) {
            let key = BlockKey {
                volume: write.volume,
                block,
            };
            let block_start = block * block_bytes;
            let from = write.offset.max(block_start);
            let to = end.min(block_start + block_bytes);
            let image = if to - from == block_bytes {
                match &write.payload {
                    Payload::Data(data) => {
                        let at = (from - write.offset) as usize;
                        BlockImage::Data(data.slice(at..at + BLOCK_SIZE))
                    }
                    Payload::Zero(_) => BlockImage::Zero,
                }
            } else {
                let entry = self
                    .index
                    .get(&key)
                    .expect("engine invariant: a partial block is pinned resident until merged");
                let mut merged = BytesMut::zeroed(BLOCK_SIZE);
                entry.image.copy_range(0, &mut merged);
                let inner = (from - block_start) as usize..(to - block_start) as usize;
                match &write.payload {
                    Payload::Data(data) => {
                        let at = (from - write.offset) as usize;
                        merged[inner.clone()].copy_from_slice(&data[at..at + inner.len()]);
                    }
                    Payload::Zero(_) => merged[inner].fill(0),
                }
                self.index.unpin(&key);
                BlockImage::Data(merged.freeze())
            };
            self.put_block(group_id, key, image);
        }
        let group = &self.groups[&group_id];
        if group.open.data_bytes >= self.config.delta_max_bytes {
            self.close_delta(group_id);
        }
        self.finish_write_ack(write.request, write.volume, group_id, write.fua);
    }

    fn put_block(&mut self, group_id: GroupId, key: BlockKey, image: BlockImage) {
        let group = self
            .groups
            .get_mut(&group_id)
            .expect("engine invariant: every volume's group exists");
        let charge = Entry::charge(&image);
        if let Some(old) = group.open.blocks.insert(key, image.clone()) {
            // Folded: a later write in the same delta replaces the block.
            let old_charge = Entry::charge(&old);
            group.open.charge -= old_charge;
            self.dirty_bytes -= old_charge;
        } else {
            group.open.data_bytes += BLOCK_SIZE as u64;
        }
        group.open.charge += charge;
        self.dirty_bytes += charge;
        if group.open.deadline.is_none() {
            let deadline = self
                .now
                .saturating_add_millis(self.config.delta_interval_ms);
            group.open.deadline = Some(deadline);
            self.deadlines.insert((deadline, group_id));
        }
        let seq = group.next_seq;
        self.index.set_dirty(key, image, seq);
    }

    fn finish_write_ack(
        &mut self,
        request: RequestId,
        volume: VolumeId,
        group: GroupId,
        fua: bool,
    ) {
        let mode = self.volume(volume).map_or(Mode::Async, |spec| spec.mode);
        if !fua && mode != Mode::Sync {
            self.reply(request, Ok(Response::Done));
            return;
        }
        // FUA (and every write in sync mode) closes the open delta early so
        // the journal, and in sync mode another site, can cover it now.
        self.close_delta(group);
        self.wait_for_journal(request, volume, group, mode);
    }
}

/// Memory a write will take: its blocks, each with bookkeeping.
fn write_charge(offset: u64, payload: &Payload) -> u64 {
    let length = payload.len();
    if length == 0 {
        return 0;
    }
    let blocks = block_span(offset, length).count() as u64;
    let per_block = match payload {
        Payload::Data(_) => BLOCK_SIZE as u64,
        // Zeroed blocks carry no buffer except where partially covered.
        Payload::Zero(_) => 0,
    };
    blocks * (per_block + crate::block_index::ENTRY_OVERHEAD_BYTES)
        + partial_blocks(VolumeId(0), offset, length).len() as u64 * BLOCK_SIZE as u64
}

/// The blocks a write covers only in part (at most the first and the last).
fn partial_blocks(volume: VolumeId, offset: u64, length: u64) -> Vec<BlockKey> {
    let block_bytes = BLOCK_SIZE as u64;
    if length == 0 {
        return Vec::new();
    }
    let end = offset + length;
    let first = offset / block_bytes;
    let last = (end - 1) / block_bytes;
    let mut blocks = Vec::with_capacity(2);
    if !offset.is_multiple_of(block_bytes) || (first == last && !end.is_multiple_of(block_bytes)) {
        blocks.push(BlockKey {
            volume,
            block: first,
        });
    }
    if last != first && !end.is_multiple_of(block_bytes) {
        blocks.push(BlockKey {
            volume,
            block: last,
        });
    }
    blocks
}

// ---------------------------------------------------------------------------
// Deltas, journal, legs

impl Engine {
    fn close_delta(&mut self, group_id: GroupId) {
        let Some(group) = self.groups.get_mut(&group_id) else {
            return;
        };
        if let Some(deadline) = group.open.deadline.take() {
            self.deadlines.remove(&(deadline, group_id));
        }
        if group.open.blocks.is_empty() {
            return;
        }
        let open = std::mem::take(&mut group.open);
        let seq = group.next_seq;
        group.next_seq = DeltaSeq(seq.0 + 1);
        let epoch = group.epoch;
        group.last_epoch = Some(epoch);
        let blocks: Vec<(BlockKey, BlockImage)> = open.blocks.into_iter().collect();
        self.stats.closed_deltas_total += 1;
        let record = self.enqueue_closed(group_id, epoch, seq, seq, blocks, open.charge, false);
        self.retain_for_peers(&record);
    }

    /// Queues a closed delta (or a received resync chunk) for the journal
    /// and then the legs, and returns the record appended to the journal.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_closed(
        &mut self,
        group_id: GroupId,
        epoch: Epoch,
        seq: DeltaSeq,
        tag: DeltaSeq,
        blocks: Vec<(BlockKey, BlockImage)>,
        charge: u64,
        resync: bool,
    ) -> DeltaRecord {
        let position = self.journal.next_position;
        self.journal.next_position += 1;
        let group = self
            .groups
            .get_mut(&group_id)
            .expect("engine invariant: a delta's group exists");
        group.last_position = position;
        let record = DeltaRecord {
            position: JournalPosition(position),
            group: group_id,
            epoch,
            seq,
            blocks: blocks.clone(),
        };
        let record_bytes = journal_record_bytes(&record);
        group.closed.push_back(ClosedDelta {
            position: JournalPosition(position),
            seq,
            first: seq,
            tag,
            resync,
            blocks,
            charge,
        });
        self.journal.unapplied.insert(position);
        self.journal.unreleased.push_back((position, record_bytes));
        self.journal.unreleased_bytes += record_bytes;
        self.actions.push_back(Action::AppendJournal {
            record: record.clone(),
        });
        self.maybe_sync_journal();
        record
    }

    /// Group commit: one sync in flight at a time; whatever was appended
    /// meanwhile rides on the next one.
    fn maybe_sync_journal(&mut self) {
        if self.failed.is_some() || self.journal.sync_in_flight {
            return;
        }
        let appended = self.journal.next_position - 1;
        if appended <= self.journal.synced_upto {
            return;
        }
        self.journal.sync_in_flight = true;
        let upto = JournalPosition(appended);
        let io = self.new_io(IoPurpose::JournalSync { upto });
        self.actions.push_back(Action::SyncJournal { io, upto });
    }

    fn wait_for_journal(
        &mut self,
        request: RequestId,
        volume: VolumeId,
        group: GroupId,
        mode: Mode,
    ) {
        let state = &self.groups[&group];
        let upto = state.last_position;
        let needs_peer = mode != Mode::Async
            && !self.config.peers.is_empty()
            && self.config.planted_bug != Some(PlantedBug::FlushSyncLocalOnly);
        let peer_seq = needs_peer.then(|| (group, DeltaSeq(state.next_seq.0 - 1)));
        if self.durable_now(upto, peer_seq) {
            self.reply(request, Ok(Response::Done));
            return;
        }
        if peer_seq.is_some() {
            self.marks.hit(Mark::WaitedForPeer);
        }
        self.pending.insert(
            request,
            Pending::Durable {
                volume,
                upto,
                peer_seq,
            },
        );
    }

    fn durable_now(&self, upto: u64, peer_seq: Option<(GroupId, DeltaSeq)>) -> bool {
        if upto > self.journal.synced_upto {
            return false;
        }
        match peer_seq {
            None => true,
            Some((group, seq)) => self.replication.some_peer_journaled(group, seq),
        }
    }

    fn answer_synced_waiters(&mut self) {
        let ready: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, pending)| match pending {
                Pending::Durable { upto, peer_seq, .. } => self.durable_now(*upto, *peer_seq),
                _ => false,
            })
            .map(|(request, _)| *request)
            .collect();
        for request in ready {
            self.pending.remove(&request);
            self.reply(request, Ok(Response::Done));
        }
    }

    /// Sends the oldest closed delta of a group to the legs once the journal
    /// holds it durably (so a crash mid-apply is redone from the journal).
    fn try_apply(&mut self, group_id: GroupId) {
        if self.failed.is_some() {
            return;
        }
        let synced = self.journal.synced_upto;
        let group = self
            .groups
            .get(&group_id)
            .expect("engine invariant: group exists");
        if group.applying.is_some() {
            return;
        }
        let snapshot_reading = self.pending.values().any(
            |pending| matches!(pending, Pending::Read(read) if read.snapshot_of == Some(group_id)),
        );
        if snapshot_reading {
            return;
        }
        let bug = self.config.planted_bug;
        let newest_ready = group
            .closed
            .iter()
            .rev()
            .find(|delta| delta.position.0 <= synced);
        let delta = match bug {
            Some(PlantedBug::ApplyNewestFirst) => newest_ready,
            Some(PlantedBug::ApplyBeforeJournalSync) => group.closed.front(),
            _ => group
                .closed
                .front()
                .filter(|delta| delta.position.0 <= synced),
        };
        let Some(delta) = delta else {
            return;
        };
        let seq = delta.seq;
        let position = delta.position.0;
        let blocks: Vec<(BlockKey, BlockImage)> = delta
            .blocks
            .iter()
            .filter(|(key, _)| self.volumes.contains_key(&key.volume))
            .cloned()
            .collect();
        self.groups
            .get_mut(&group_id)
            .expect("engine invariant: group exists")
            .applying = Some(position);
        let io = self.new_io(IoPurpose::LegWrite { group: group_id });
        self.actions.push_back(Action::WriteLeg {
            io,
            group: group_id,
            seq,
            blocks,
        });
    }

    /// Syncs the legs and releases journal records they hold, once enough
    /// journal has piled up (or when draining).
    fn maybe_checkpoint(&mut self) {
        if self.failed.is_some() || self.journal.leg_sync_in_flight.is_some() {
            return;
        }
        let applied_prefix = match self.journal.unapplied.first() {
            Some(first) => first - 1,
            None => self.journal.next_position - 1,
        };
        if applied_prefix <= self.journal.released_upto {
            return;
        }
        // Only records already on the legs can be released: count those, or
        // a backlog of journaled-but-unapplied deltas would make every
        // single apply trigger a leg sync.
        let releasable: u64 = self
            .journal
            .unreleased
            .iter()
            .take_while(|(position, _)| *position <= applied_prefix)
            .map(|(_, bytes)| bytes)
            .sum();
        let worth_it = releasable >= self.config.journal_checkpoint_bytes;
        if !worth_it && !self.draining {
            return;
        }
        self.journal.leg_sync_in_flight = Some(applied_prefix);
        let volumes: Vec<VolumeId> = std::mem::take(&mut self.journal.touched_volumes)
            .into_iter()
            .collect();
        let io = self.new_io(IoPurpose::LegSync {
            upto: applied_prefix,
        });
        self.actions.push_back(Action::SyncLegs { io, volumes });
    }

    fn fail(&mut self, reason: String) {
        if self.failed.is_some() {
            return;
        }
        self.failed = Some(reason.clone());
        let waiting: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, pending)| matches!(pending, Pending::Durable { .. }))
            .map(|(request, _)| *request)
            .collect();
        for request in waiting {
            self.pending.remove(&request);
            self.reply(request, Err(RequestError::Failed(reason.clone())));
        }
        while let Some(write) = self.throttled.pop_front() {
            self.reply(write.request, Err(RequestError::Failed(reason.clone())));
        }
    }

    /// Time only moves forward; completions without a timestamp use the
    /// latest one seen (a delta opened then closes at most that much early).
    fn observe(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        if !self.clock_seen {
            self.clock_seen = true;
            let stretched = self.stretched_lease_nanos();
            self.read_leases.clock_known(self.now, stretched);
        }
    }

    fn new_io(&mut self, purpose: IoPurpose) -> IoId {
        let io = IoId(self.next_io);
        self.next_io += 1;
        self.ios.insert(io, purpose);
        io
    }

    fn reply(&mut self, request: RequestId, result: Result<Response, RequestError>) {
        self.read_leases.finish_write(request);
        let result = self.fence_reply(request, result);
        let Some(result) = replication::route_reply(self, request, result) else {
            return;
        };
        self.actions.push_back(Action::Reply { request, result });
    }
}

/// Journal bytes a record takes, as the storage layer lays it out: a fixed
/// header plus, per block, its key and (for data blocks) its image.
fn journal_record_bytes(record: &DeltaRecord) -> u64 {
    const HEADER_BYTES: u64 = 48;
    const BLOCK_HEADER_BYTES: u64 = 13;
    record
        .blocks
        .iter()
        .map(|(_, image)| BLOCK_HEADER_BYTES + image.memory_bytes())
        .sum::<u64>()
        + HEADER_BYTES
}

#[cfg(test)]
mod tests;
