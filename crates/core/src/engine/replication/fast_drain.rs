//! Fast live migration: ownership moves first, the data it lacks after.
//!
//! At the switchover the source seals the group at its newest delta `L`
//! (nothing left open, every delta up to `L` durable in its journal) and
//! the authority names the target owner from `L + 1`, recording the
//! regions the target may lack: every region written by a delta the
//! target had not applied, and those a resync of it had not finished
//! ([`Engine::fast_seal`]). Rules:
//! - the target serves at once. A request touching a region it may still
//!   lack (a client's read or write, another site's strict read) waits
//!   while that region is copied from the source, ahead of the others,
//!   which are copied in the background, `resync_chunks_in_flight_max` at a
//!   time. Requests touching no such region never wait;
//! - a copied region enters the target's open delta as if written there:
//!   the target wrote nothing in it since `L` (its requests waited), so its
//!   journal, legs, recovery and the other sites see an ordinary delta,
//!   and journal order is the order of every image of the region;
//! - a region stops holding requests back only once the delta holding its
//!   copy is synced in the journal and the region is appended, durably, to
//!   the drain's log ([`Action::SaveFastDrain`]): after a crash the target
//!   asks again for every region the log does not name, and it wrote
//!   nothing in any of those;
//! - the source answers the copies from its image without an ownership
//!   lease: the target writes no region it may lack, so the source's image
//!   of such a region is the one at `L`, which nothing changes;
//! - while the drain runs the target is durably marked mid-resync (a
//!   restart does not offer its image to a failover; its writes wait for
//!   the mark once), grants no read leases on the group, and does not
//!   resync to the source a region it lacks (the source's is the newest);
//! - copies asked, read or not yet on the legs share one window of
//!   `resync_chunks_in_flight_max` regions over every drain here, which the
//!   cache bound allows for;
//! - the drain ends when every region is logged (the owner's driver then
//!   commits its end), or when an operator accepts the loss of what was
//!   not copied (the source was lost): the target's older image of those
//!   regions stands, and is written again from it, behind the same gate,
//!   so a returning source converges on it; ownership moving away from the
//!   target first leaves it a replica marked mid-resync, resynced whole.
//!
//! Two data sites only: with a third, its image would lag the target's in
//! regions the target copies, and neither site could resync it.

use super::*;

/// A region: `(volume, block / region_blocks)`.
type Region = (VolumeId, u64);

/// Most regions a drain record names; a target lacking more copies every
/// region of the group (the record is one metadata command).
pub const FAST_DRAIN_REGIONS_MAX: usize = 65_536;

/// A copy the source refused (it has not applied the switchover yet) is
/// asked again after this long.
const REFUSED_RETRY_MS: u64 = 50;

/// Asks that timed out whose answers are still taken if they come, per
/// drain: a source slower than the remote timeout (a slow disk) would
/// otherwise never get a copy through, each answer arriving after its ask
/// was replaced.
const LATE_ASKS_MAX: usize = 64;

/// A fast migration's drain, as the ownership authority recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastDrain {
    /// The old owner, whose image the regions are copied from.
    pub source: SiteId,
    /// The new owner.
    pub target: SiteId,
    /// The epoch the switchover raised the group to.
    pub epoch: Epoch,
    /// The regions the target may lack; `None`: every region of the group.
    pub regions: Option<Vec<(VolumeId, u64)>>,
}

/// A group sealed for a fast switchover ([`Engine::fast_seal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedGroup {
    /// The last delta of the old owner's epoch: the new one starts after.
    pub last: DeltaSeq,
    /// The regions the target may lack; `None`: every region.
    pub regions: Option<Vec<(VolumeId, u64)>>,
}

/// How far a drain is at its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastDrainProgress {
    pub source: SiteId,
    /// Regions the drain started with, and those requests may still wait
    /// for (not durably copied).
    pub regions_total: u64,
    pub regions_left: u64,
}

/// This site's part in a group's drain.
#[derive(Debug)]
pub(super) enum DrainRole {
    /// The target: copying from `source`.
    Target(Box<Copying>),
    /// The source: answering the target's copies from its image.
    Source {
        target: SiteId,
        regions_total: u64,
        /// Copies answered (a region asked again counts again).
        served: u64,
    },
}

#[derive(Debug)]
pub(super) struct Copying {
    source: SiteId,
    epoch: Epoch,
    regions_total: u64,
    /// Not copied and not asked for.
    lacking: BTreeSet<Region>,
    /// Asked of the source: request id to region and when to ask again.
    asked: BTreeMap<u64, (Region, Timestamp)>,
    /// Asks that timed out (asked again since): their answers are taken
    /// if the region is still not copied. At most [`LATE_ASKS_MAX`].
    late: BTreeMap<u64, Region>,
    /// Being read from this site's own image (the loss of the source's
    /// was accepted).
    reading: BTreeSet<Region>,
    /// Copied into the delta at this journal position, not yet logged.
    copied: Vec<(u64, Region)>,
    /// Journal positions of the deltas holding copies, until they are on
    /// the legs: their blocks are in the cache until then.
    applying: Vec<u64>,
    /// Being appended to the drain's log.
    logging: Option<(IoId, Vec<Region>)>,
    /// The group is durably marked as mid-resync here: writes wait until
    /// it is (a restart must not take this image for a whole one).
    marked: bool,
    /// Every region not durably logged: requests touching one wait.
    gated: BTreeSet<Region>,
    /// Regions a waiting request needs: asked first.
    wanted: BTreeSet<Region>,
    waiting: VecDeque<Waiting>,
    /// Copies were refused: ask again from then.
    paused_until: Option<Timestamp>,
}

#[derive(Debug)]
enum Waiting {
    Request {
        request: RequestId,
        body: Request,
        deadline: Timestamp,
    },
    Message {
        from: SiteId,
        message: SiteMessage,
        deadline: Timestamp,
    },
}

impl Waiting {
    fn deadline(&self) -> Timestamp {
        match self {
            Waiting::Request { deadline, .. } | Waiting::Message { deadline, .. } => *deadline,
        }
    }
}

/// The regions `volume`'s bytes `offset .. offset + length` touch.
fn regions_touched(volume: VolumeId, offset: u64, length: u64, region_blocks: u64) -> Vec<Region> {
    if length == 0 {
        return Vec::new();
    }
    let region_bytes = region_blocks * BLOCK_SIZE as u64;
    let first = offset / region_bytes;
    let last = (offset + length - 1) / region_bytes;
    (first..=last).map(|region| (volume, region)).collect()
}

impl Copying {
    /// The ask `id` was answered: `Some(Some(region))` to take the copy,
    /// `Some(None)` for a late answer whose region is copied already (or
    /// being copied), `None` if `id` is no ask of this drain.
    fn take_answered(&mut self, id: u64) -> Option<Option<Region>> {
        if let Some((region, _)) = self.asked.remove(&id) {
            return Some(Some(region));
        }
        let region = self.late.remove(&id)?;
        // Still not copied: not asked again yet, or asked again (that ask's
        // answer, when it comes, finds the region copied).
        let asked_again: Vec<u64> = self
            .asked
            .iter()
            .filter(|(_, (asked, _))| *asked == region)
            .map(|(id, _)| *id)
            .collect();
        if !self.lacking.remove(&region) && asked_again.is_empty() {
            return Some(None);
        }
        for id in asked_again {
            self.asked.remove(&id);
            self.late.insert(id, region);
        }
        Some(Some(region))
    }

    /// The regions of `range` a request must wait for: those not durably
    /// copied, and every one for a change before the mark is saved.
    fn holds_back(
        &self,
        (volume, offset, length): (VolumeId, u64, u64),
        write: bool,
        region_blocks: u64,
    ) -> Vec<Region> {
        regions_touched(volume, offset, length, region_blocks)
            .into_iter()
            .filter(|region| self.gated.contains(region) || (write && !self.marked))
            .collect()
    }
}

/// True for a request that changes data.
fn is_change(request: &Request) -> bool {
    matches!(request, Request::Write { .. } | Request::WriteZeroes { .. })
}

/// The byte range a request reads or changes, if it touches data.
fn request_range(request: &Request) -> Option<(VolumeId, u64, u64)> {
    match request {
        Request::Read {
            volume,
            offset,
            length,
        }
        | Request::ReadSnapshot {
            volume,
            offset,
            length,
        }
        | Request::WriteZeroes {
            volume,
            offset,
            length,
            ..
        } => Some((*volume, *offset, *length)),
        Request::Write {
            volume,
            offset,
            data,
            ..
        } => Some((*volume, *offset, data.len() as u64)),
        Request::Trim { .. } | Request::Flush { .. } => None,
    }
}

// ---------------------------------------------------------------------------
// Public API

impl Engine {
    /// Where `group`'s fast drain stands, as the authority recorded it
    /// with the group's `owner`: `None` when no drain runs. Call it before
    /// [`Engine::set_owner`] with the same record's owner and epoch (the
    /// target numbers its deltas from the sealed seq on as soon as it owns
    /// the group), after [`Engine::set_epoch_history`] (which says where
    /// the seal is). A drain that ends before every region was copied
    /// either leaves the target owning the group (an operator accepted the
    /// loss: its older image of those regions stands, and the source is
    /// resynced from it) or another site (a failover: the target's image
    /// is incomplete, and it is resynced whole).
    pub fn set_fast_drain(&mut self, group: GroupId, owner: SiteId, drain: Option<FastDrain>) {
        let site = self.config.site;
        let Some(drain) = drain else {
            self.end_fast_drain(group, owner);
            return;
        };
        if drain.source == site {
            if matches!(
                self.replication.fast_drains.get(&group),
                Some(DrainRole::Source { target, .. }) if *target == drain.target
            ) {
                return;
            }
            let regions_total = drain.regions.map_or_else(
                || self.every_region_of(group).len() as u64,
                |regions| regions.len() as u64,
            );
            self.replication.fast_drains.insert(
                group,
                DrainRole::Source {
                    target: drain.target,
                    regions_total,
                    served: 0,
                },
            );
            return;
        }
        if drain.target != site {
            self.replication.fast_drains.remove(&group);
            return;
        }
        if let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get(&group)
            && copying.epoch == drain.epoch
        {
            return;
        }
        let regions: BTreeSet<Region> = match drain.regions {
            Some(regions) => regions.into_iter().collect(),
            None => self.every_region_of(group).into_iter().collect(),
        };
        let logged = self
            .replication
            .fast_drain_logged
            .remove(&(group, drain.epoch))
            .unwrap_or_default();
        let lacking: BTreeSet<Region> = regions.difference(&logged).copied().collect();
        self.marks.hit(Mark::FastDrainStarted);
        if !logged.is_empty() {
            self.marks.hit(Mark::FastDrainResumedFromLog);
        }
        let marked = self.marked(group);
        self.replication.fast_drains.insert(
            group,
            DrainRole::Target(Box::new(Copying {
                source: drain.source,
                epoch: drain.epoch,
                regions_total: regions.len() as u64,
                gated: lacking.clone(),
                lacking,
                asked: BTreeMap::new(),
                late: BTreeMap::new(),
                reading: BTreeSet::new(),
                copied: Vec::new(),
                applying: Vec::new(),
                logging: None,
                marked,
                wanted: BTreeSet::new(),
                waiting: VecDeque::new(),
                paused_until: None,
            })),
        );
        // Numbered from the seal on, before any request can be served as
        // the owner (set_owner serves those that waited for it).
        if let Some(after) = self.fast_drain_numbering(group)
            && let Some(state) = self.groups.get_mut(&group)
            && state.next_seq <= after
        {
            state.next_seq = DeltaSeq(after.0 + 1);
            state.last_epoch = None;
        }
        // Its image is at no delta boundary until the drain ends: durably
        // marked so (a restart here must not offer it to a failover).
        self.save_resync_marks(None);
        if self.owner_of(group) == site {
            self.pump_fast_drain(group);
        }
    }

    /// At start, before [`Engine::set_fast_drain`]: the regions the drain
    /// of `group` under `epoch` logged as copied before a restart.
    pub fn restore_fast_drain_log(
        &mut self,
        group: GroupId,
        epoch: Epoch,
        regions: BTreeSet<(VolumeId, u64)>,
    ) {
        self.replication
            .fast_drain_logged
            .insert((group, epoch), regions);
    }

    /// The outcome of an [`Action::SaveFastDrain`].
    pub fn fast_drain_saved(&mut self, io: IoId, result: Result<(), String>) {
        let Some(IoPurpose::DrainLog { group }) = self.ios.remove(&io) else {
            panic!("engine invariant: io {io} is not a drain-log append in flight");
        };
        if let Err(reason) = result {
            self.fail(format!(
                "appending to the fast drain's log failed: {reason}"
            ));
            return;
        }
        let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) else {
            // The drain ended meanwhile.
            return;
        };
        let Some((logging, regions)) = copying.logging.take() else {
            panic!("engine invariant: a drain-log append in flight records its regions");
        };
        assert_eq!(
            logging, io,
            "engine invariant: one drain-log append in flight"
        );
        for region in &regions {
            copying.gated.remove(region);
            copying.wanted.remove(region);
        }
        let done = copying.gated.is_empty();
        let loss_rewritten = done && copying.source == self.config.site;
        if done {
            // Whole again: no longer marked.
            self.save_resync_marks(None);
        }
        self.release_fast_drain_waiters(group);
        if loss_rewritten {
            // Its record is gone already (the loss was accepted).
            self.replication.fast_drains.remove(&group);
            return;
        }
        self.log_fast_drain_copies(group);
        self.pump_fast_drain(group);
    }

    /// The drain of `group`, if this site is its source or target. At the
    /// target, exact; at the source, the regions it has not answered yet
    /// (a copy asked again counts twice: an estimate, for progress).
    pub fn fast_drain_progress(&self, group: GroupId) -> Option<FastDrainProgress> {
        match self.replication.fast_drains.get(&group)? {
            DrainRole::Target(copying) => Some(FastDrainProgress {
                source: copying.source,
                regions_total: copying.regions_total,
                regions_left: copying.gated.len() as u64,
            }),
            DrainRole::Source {
                regions_total,
                served,
                ..
            } => Some(FastDrainProgress {
                source: self.config.site,
                regions_total: *regions_total,
                regions_left: regions_total.saturating_sub(*served),
            }),
        }
    }

    /// True when this site (the owner, handing `group` over) may seal it
    /// for a fast switchover to `to`: no write of the group is open or in
    /// flight, every closed delta is durable in the journal (the target
    /// numbers from the seal on, so it must survive a crash here), and `to`
    /// streams deltas or is being resynced (connected, with what it lacks
    /// known here: the regions of the deltas it has not applied and those
    /// its resync has not finished). Two data sites only.
    pub fn fast_hand_over_ready(&self, group: GroupId, to: SiteId) -> bool {
        let Some(state) = self.groups.get(&group) else {
            return false;
        };
        let streaming = self
            .replication
            .outbound
            .get(&group)
            .and_then(|outbound| outbound.peers.get(&to))
            .is_some_and(|peer| matches!(peer.state, PeerState::Streaming | PeerState::Resyncing));
        self.config.peers == [to]
            && self.replication.is_handing_over(group)
            && state.open.blocks.is_empty()
            && state.last_position <= self.journal.synced_upto
            && !self.group_writes_in_flight(group)
            && streaming
    }

    /// Seals `group` for a fast switchover to `to` (see
    /// [`Engine::fast_hand_over_ready`], which must hold): the last delta
    /// of this ownership, and the regions `to` may lack (`None` past
    /// [`FAST_DRAIN_REGIONS_MAX`]: every region).
    pub fn fast_seal(&self, group: GroupId, to: SiteId) -> Option<SealedGroup> {
        if !self.fast_hand_over_ready(group, to) {
            return None;
        }
        let last = DeltaSeq(self.groups[&group].next_seq.0 - 1);
        let outbound = self.replication.outbound.get(&group)?;
        let progress = outbound.peers.get(&to)?;
        if progress.dirty_all {
            return Some(SealedGroup {
                last,
                regions: None,
            });
        }
        let region_blocks = self.config.region_blocks;
        let mut regions: BTreeSet<Region> = outbound
            .retained
            .iter()
            .filter(|retained| retained.seq > progress.applied)
            .flat_map(|retained| regions_of(&retained.record, region_blocks))
            .collect();
        // A resync's regions not copied yet, not acknowledged, or being
        // read for it.
        regions.extend(progress.dirty.iter().copied());
        regions.extend(progress.unacked_regions());
        regions.extend(
            self.replication
                .internal
                .values()
                .filter_map(|internal| match internal {
                    Internal::ResyncRead {
                        peer,
                        group: read_group,
                        region,
                        ..
                    } if *read_group == group && *peer == to => Some(*region),
                    _ => None,
                }),
        );
        let regions =
            (regions.len() <= FAST_DRAIN_REGIONS_MAX).then(|| regions.into_iter().collect());
        Some(SealedGroup { last, regions })
    }
}

// ---------------------------------------------------------------------------
// Inside the engine

impl Engine {
    /// Holds `body` while it touches a region the drain of `group` may
    /// still lack here, asking for those regions first. True if held (or
    /// refused past the bound).
    pub(in crate::engine) fn fast_drain_gate(
        &mut self,
        request: RequestId,
        body: &Request,
        group: GroupId,
    ) -> bool {
        let Some(range) = request_range(body) else {
            return false;
        };
        let Some(needed) = self.fast_drain_needs(group, range, is_change(body)) else {
            return false;
        };
        let deadline = self
            .now
            .saturating_add_millis(self.config.remote_timeout_ms);
        if !self.fast_drain_wait(
            group,
            needed,
            Waiting::Request {
                request,
                body: body.clone(),
                deadline,
            },
        ) {
            self.reply(
                request,
                Err(RequestError::Io(format!(
                    "too many requests wait for group {group}'s fast migration to copy their data"
                ))),
            );
        }
        true
    }

    /// At a drain's target: holds another site's strict read of a region
    /// not copied yet (this site's image of it is older than the source's,
    /// and maybe than the asking site's). True if held.
    pub(super) fn fast_drain_holds_read(
        &mut self,
        from: SiteId,
        group: GroupId,
        message: &SiteMessage,
    ) -> bool {
        let SiteMessage::ReadRequest { request, .. } = message else {
            return false;
        };
        let Some(range) = request_range(request) else {
            return false;
        };
        let Some(needed) = self.fast_drain_needs(group, range, false) else {
            return false;
        };
        let deadline = self
            .now
            .saturating_add_millis(self.config.remote_timeout_ms / 2);
        // Past the bound it is answered as it would be without the drain
        // gate: refused below (this site serves it only when copied).
        self.fast_drain_wait(
            group,
            needed,
            Waiting::Message {
                from,
                message: message.clone(),
                deadline,
            },
        )
    }

    /// The regions of `range` the drain of `group` holds requests for, if
    /// this site is its target, owns the group, and some are.
    fn fast_drain_needs(
        &self,
        group: GroupId,
        range: (VolumeId, u64, u64),
        write: bool,
    ) -> Option<Vec<Region>> {
        let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get(&group) else {
            return None;
        };
        if self.owner_of(group) != self.config.site {
            return None;
        }
        if write && self.config.planted_bug == Some(PlantedBug::FastDrainWritesUncopied) {
            return None;
        }
        let needed = copying.holds_back(range, write, self.config.region_blocks);
        (!needed.is_empty()).then_some(needed)
    }

    fn fast_drain_wait(&mut self, group: GroupId, needed: Vec<Region>, waiting: Waiting) -> bool {
        let bound = self.config.suspended_requests_max;
        let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) else {
            return false;
        };
        if copying.waiting.len() >= bound {
            return false;
        }
        let gated: Vec<Region> = needed
            .into_iter()
            .filter(|region| copying.gated.contains(region))
            .collect();
        copying.wanted.extend(gated);
        copying.waiting.push_back(waiting);
        self.marks.hit(Mark::FastDrainRequestWaited);
        self.pump_fast_drain(group);
        true
    }

    /// True if `group` is copying here, as its drain's target: no read
    /// leases are granted on it meanwhile.
    pub(in crate::engine) fn fast_drain_copying(&self, group: GroupId) -> bool {
        matches!(
            self.replication.fast_drains.get(&group),
            Some(DrainRole::Target(_))
        )
    }

    /// True if `region` of `group` is one this site, as its drain's
    /// target, lacks and `peer` is the source: `peer`'s image of it is the
    /// newest, and a resync from here must not replace it.
    pub(super) fn fast_drain_source_holds(
        &self,
        group: GroupId,
        peer: SiteId,
        region: Region,
    ) -> bool {
        matches!(
            self.replication.fast_drains.get(&group),
            Some(DrainRole::Target(copying)) if copying.source == peer && copying.gated.contains(&region)
        )
    }

    /// At a drain's source: `from` is the target asking for a copy.
    pub(super) fn serves_fast_drain(&self, group: GroupId, from: SiteId) -> bool {
        matches!(
            self.replication.fast_drains.get(&group),
            Some(DrainRole::Source { target, .. }) if *target == from
        )
    }

    /// At a drain's source: one more copy answered.
    pub(super) fn count_fast_drain_served(&mut self, group: GroupId) {
        self.marks.hit(Mark::FastDrainServed);
        if let Some(DrainRole::Source { served, .. }) = self.replication.fast_drains.get_mut(&group)
        {
            *served += 1;
        }
    }

    /// Asks the source for regions, those requests wait for first, while
    /// fewer than `resync_chunks_in_flight_max` are in flight.
    pub(super) fn pump_fast_drain(&mut self, group: GroupId) {
        if self.owner_of(group) != self.config.site {
            return;
        }
        let now = self.now;
        // One window for every drain here, as a replica's resyncs share
        // one: what copies may add to the cache (asked, or not yet on the
        // legs), which the cache bound allows for.
        let in_flight_max = self.config.resync_chunks_in_flight_max.max(1);
        let mut in_flight = self.fast_drain_copies_in_flight();
        let timeout_ms = self.config.remote_timeout_ms;
        let region_bytes = self.config.region_blocks * BLOCK_SIZE as u64;
        let site = self.config.site;
        let connected = &self.replication.connected;
        let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) else {
            return;
        };
        let local = copying.source == site;
        if !local && !connected.contains(&copying.source) {
            return;
        }
        if copying.paused_until.is_some_and(|until| until > now) {
            return;
        }
        copying.paused_until = None;
        let mut asks = Vec::new();
        while in_flight < in_flight_max {
            let wanted = copying
                .wanted
                .iter()
                .find(|region| copying.lacking.contains(*region))
                .copied();
            let Some(region) = wanted.or_else(|| copying.lacking.first().copied()) else {
                break;
            };
            copying.lacking.remove(&region);
            let id = self.replication.next_remote;
            self.replication.next_remote += 1;
            copying
                .asked
                .insert(id, (region, now.saturating_add_millis(timeout_ms)));
            asks.push((id, region));
            in_flight += 1;
        }
        let source = copying.source;
        for (id, (volume, index)) in asks {
            let size = self.volume(volume).map_or(0, |spec| spec.size);
            let offset = index * region_bytes;
            let length = region_bytes.min(size.saturating_sub(offset));
            if local {
                let internal = self.new_internal(Internal::DrainCopy {
                    group,
                    region: (volume, index),
                });
                if let Some(DrainRole::Target(copying)) =
                    self.replication.fast_drains.get_mut(&group)
                    && let Some((region, _)) = copying.asked.remove(&id)
                {
                    copying.reading.insert(region);
                }
                self.start_read(internal, volume, offset, length, None);
                continue;
            }
            self.actions.push_back(Action::Send {
                peer: source,
                message: SiteMessage::ReadRequest {
                    id,
                    request: Request::Read {
                        volume,
                        offset,
                        length,
                    },
                    have: None,
                },
            });
        }
    }

    /// A copy the source sent (or refused). False if `id` is no copy's.
    pub(super) fn receive_fast_drain_copy(
        &mut self,
        id: u64,
        result: &Result<Vec<(BlockKey, BlockImage)>, RequestError>,
    ) -> bool {
        let found = self
            .replication
            .fast_drains
            .iter_mut()
            .find_map(|(group, role)| match role {
                DrainRole::Target(copying) => {
                    copying.take_answered(id).map(|region| (*group, region))
                }
                DrainRole::Source { .. } => None,
            });
        let Some((group, region)) = found else {
            return false;
        };
        let Some(region) = region else {
            // A late answer for a region copied since: nothing to take.
            return true;
        };
        let blocks = match result {
            Ok(blocks) => blocks,
            Err(_) => {
                // The source has not applied the switchover yet (or its
                // read failed): asked again shortly.
                self.fast_drain_ask_again(group, region);
                return true;
            }
        };
        if self.check_copy(region, blocks).is_err() {
            // Not the region's blocks: untrusted bytes, refused whole.
            self.stats.refused_messages_total += 1;
            self.fast_drain_ask_again(group, region);
            return true;
        }
        self.marks.hit(Mark::FastDrainRegionCopied);
        self.take_copy(group, region, blocks.iter().cloned());
        true
    }

    /// A region read from this site's own image, after the loss of the
    /// source's was accepted.
    pub(super) fn local_drain_copy_done(
        &mut self,
        group: GroupId,
        region: Region,
        result: Result<Response, RequestError>,
    ) {
        let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) else {
            return;
        };
        copying.reading.remove(&region);
        let (volume, index) = region;
        let first_block = index * self.config.region_blocks;
        match result {
            Ok(Response::Data(data)) => {
                self.take_copy(group, region, blocks_read(volume, first_block, &data));
            }
            // A deleted volume has nothing left to copy; a failed read
            // fails the engine (the leg is unreadable).
            Ok(Response::Done) | Err(_) => {
                self.take_copy(group, region, Vec::new());
            }
        }
    }

    /// Puts a copied region into the open delta and closes it: durable
    /// after one journal sync, then logged.
    fn take_copy(
        &mut self,
        group: GroupId,
        region: Region,
        blocks: impl IntoIterator<Item = (BlockKey, BlockImage)>,
    ) {
        let blocks: Vec<(BlockKey, BlockImage)> = blocks.into_iter().collect();
        // Taken whatever the room (the window of copies bounds them, and
        // the cache bound allows for it), after clean blocks made room.
        let charge: u64 = blocks.iter().map(|(_, image)| Entry::charge(image)).sum();
        self.make_room(charge);
        for (key, image) in blocks {
            self.put_block(group, key, image);
        }
        // Closed now: its own delta, so the region is durable (and may be
        // logged) after one journal sync.
        self.close_delta(group);
        let position = self
            .groups
            .get(&group)
            .map_or(0, |state| state.last_position);
        if let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) {
            copying.copied.push((position, region));
            copying.applying.push(position);
        }
        self.maybe_sync_journal();
        self.log_fast_drain_copies(group);
        self.pump_fast_drain(group);
    }

    /// A copy must be exactly the region's blocks, each whole.
    fn check_copy(&self, region: Region, blocks: &[(BlockKey, BlockImage)]) -> Result<(), String> {
        let (volume, index) = region;
        let size = self
            .volume(volume)
            .ok_or_else(|| format!("volume {volume} is gone"))?
            .size;
        let region_blocks = self.config.region_blocks;
        let first = index * region_blocks;
        let end = (first + region_blocks).min(size.div_ceil(BLOCK_SIZE as u64));
        if blocks.len() as u64 != end.saturating_sub(first) {
            return Err(format!(
                "{} blocks for region {index} of volume {volume}, which has {}",
                blocks.len(),
                end.saturating_sub(first)
            ));
        }
        for (number, (key, image)) in blocks.iter().enumerate() {
            let whole = match image {
                BlockImage::Data(data) => data.len() == BLOCK_SIZE,
                BlockImage::Zero => true,
            };
            if key.volume != volume || key.block != first + number as u64 || !whole {
                return Err(format!("block {key:?} is not block {number} of the region"));
            }
        }
        Ok(())
    }

    fn fast_drain_ask_again(&mut self, group: GroupId, region: Region) {
        let retry = self.now.saturating_add_millis(REFUSED_RETRY_MS);
        if let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) {
            copying.lacking.insert(region);
            copying.paused_until = Some(retry);
        }
    }

    /// After a journal sync: copies now durable are appended to the log,
    /// one append in flight per group.
    pub(in crate::engine) fn log_fast_drain_copies(&mut self, group: GroupId) {
        let synced = self.journal.synced_upto;
        let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) else {
            return;
        };
        if copying.logging.is_some() {
            return;
        }
        let (durable, pending): (Vec<_>, Vec<_>) = copying
            .copied
            .drain(..)
            .partition(|(position, _)| *position <= synced);
        copying.copied = pending;
        if durable.is_empty() {
            return;
        }
        let regions: Vec<Region> = durable.into_iter().map(|(_, region)| region).collect();
        let epoch = copying.epoch;
        let io = self.new_io(IoPurpose::DrainLog { group });
        if let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) {
            copying.logging = Some((io, regions.clone()));
        }
        self.actions.push_back(Action::SaveFastDrain {
            io,
            group,
            epoch,
            regions,
        });
    }

    /// Every group's copies after a journal sync.
    pub(in crate::engine) fn fast_drains_after_sync(&mut self) {
        let groups: Vec<GroupId> = self.replication.fast_drains.keys().copied().collect();
        for group in groups {
            self.log_fast_drain_copies(group);
        }
    }

    /// Serves the waiting requests nothing holds back any more.
    fn release_fast_drain_waiters(&mut self, group: GroupId) {
        let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) else {
            return;
        };
        let region_blocks = self.config.region_blocks;
        let mut ready = Vec::new();
        let mut keep = VecDeque::new();
        for waiting in std::mem::take(&mut copying.waiting) {
            let (range, write) = match &waiting {
                Waiting::Request { body, .. } => (request_range(body), is_change(body)),
                Waiting::Message {
                    message: SiteMessage::ReadRequest { request, .. },
                    ..
                } => (request_range(request), false),
                Waiting::Message { .. } => (None, false),
            };
            let held = range
                .is_some_and(|range| !copying.holds_back(range, write, region_blocks).is_empty());
            if held {
                keep.push_back(waiting);
            } else {
                ready.push(waiting);
            }
        }
        copying.waiting = keep;
        self.resume_fast_drain_waiters(ready);
    }

    /// At the target, once the resync marks are saved: writes may go on if
    /// the group is durably marked.
    pub(super) fn fast_drains_marked(&mut self) {
        let groups: Vec<GroupId> = self
            .replication
            .fast_drains
            .iter()
            .filter(|(_, role)| matches!(role, DrainRole::Target(copying) if !copying.marked))
            .map(|(group, _)| *group)
            .collect();
        for group in groups {
            let marked = self.marked(group);
            if let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group) {
                copying.marked = marked;
            }
            if marked {
                self.release_fast_drain_waiters(group);
            }
        }
    }

    fn resume_fast_drain_waiters(&mut self, ready: impl IntoIterator<Item = Waiting>) {
        let now = self.now;
        for waiting in ready {
            match waiting {
                Waiting::Request { request, body, .. } => self.submit(now, request, body),
                Waiting::Message { from, message, .. } => self.receive(now, from, message),
            }
        }
    }

    /// The drain's next deadline: a copy to ask again, a request to fail.
    pub(in crate::engine) fn fast_drain_deadline(&self) -> Option<Timestamp> {
        self.replication
            .fast_drains
            .values()
            .filter_map(|role| match role {
                DrainRole::Target(copying) => {
                    let asked = copying.asked.values().map(|(_, at)| *at).min();
                    let waiting = copying.waiting.iter().map(Waiting::deadline).min();
                    [asked, waiting, copying.paused_until]
                        .into_iter()
                        .flatten()
                        .min()
                }
                DrainRole::Source { .. } => None,
            })
            .min()
    }

    /// Asks again for copies not answered in time; fails requests that
    /// waited past their deadline (the source does not answer).
    pub(in crate::engine) fn expire_fast_drains(&mut self, now: Timestamp) {
        let groups: Vec<GroupId> = self.replication.fast_drains.keys().copied().collect();
        let timeout_ms = self.config.remote_timeout_ms;
        for group in groups {
            let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get_mut(&group)
            else {
                continue;
            };
            let late: Vec<u64> = copying
                .asked
                .iter()
                .filter(|(_, (_, at))| *at <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in late {
                if let Some((region, _)) = copying.asked.remove(&id) {
                    copying.lacking.insert(region);
                    copying.late.insert(id, region);
                }
            }
            while copying.late.len() > LATE_ASKS_MAX {
                copying.late.pop_first();
            }
            let (expired, keep): (VecDeque<Waiting>, VecDeque<Waiting>) = copying
                .waiting
                .drain(..)
                .partition(|waiting| waiting.deadline() <= now);
            copying.waiting = keep;
            let source = copying.source;
            for waiting in expired {
                self.marks.hit(Mark::FastDrainRequestTimedOut);
                let reason = format!(
                    "group {group}'s data is still being copied from site {source}, which did not answer within {timeout_ms} ms"
                );
                match waiting {
                    Waiting::Request { request, .. } => {
                        self.reply(request, Err(RequestError::Io(reason)));
                    }
                    Waiting::Message {
                        from,
                        message: SiteMessage::ReadRequest { id, .. },
                        ..
                    } => self.actions.push_back(Action::Send {
                        peer: from,
                        message: SiteMessage::ReadReply {
                            id,
                            result: Err(RequestError::Io(reason)),
                        },
                    }),
                    Waiting::Message { .. } => {}
                }
            }
            self.pump_fast_drain(group);
        }
    }

    /// The source's connection is back (ask it) or gone (what was asked
    /// is asked again on the next connection).
    pub(super) fn fast_drains_peer_changed(&mut self, peer: SiteId, up: bool) {
        let groups: Vec<GroupId> = self
            .replication
            .fast_drains
            .iter()
            .filter(
                |(_, role)| matches!(role, DrainRole::Target(copying) if copying.source == peer),
            )
            .map(|(group, _)| *group)
            .collect();
        for group in groups {
            if !up
                && let Some(DrainRole::Target(copying)) =
                    self.replication.fast_drains.get_mut(&group)
            {
                let asked = std::mem::take(&mut copying.asked);
                copying
                    .lacking
                    .extend(asked.into_values().map(|(region, _)| region));
            }
            self.pump_fast_drain(group);
        }
    }

    /// At the target, when it becomes the owner of a group it drains: its
    /// deltas are numbered after the sealed seq.
    pub(super) fn fast_drain_numbering(&self, group: GroupId) -> Option<DeltaSeq> {
        let Some(DrainRole::Target(copying)) = self.replication.fast_drains.get(&group) else {
            return None;
        };
        let history = self.replication.epoch_history.get(&group)?;
        history
            .iter()
            .find(|start| start.epoch == copying.epoch)
            .map(|start| start.after_seq)
    }

    /// The group no longer drains: requests that waited are served now
    /// (or sent on to the new owner). See [`Engine::set_fast_drain`].
    fn end_fast_drain(&mut self, group: GroupId, owner: SiteId) {
        let site = self.config.site;
        let Some(role) = self.replication.fast_drains.remove(&group) else {
            return;
        };
        let DrainRole::Target(mut copying) = role else {
            return;
        };
        if !copying.gated.is_empty() {
            if owner == site {
                if copying.source == site {
                    // Already copying from its own image.
                    self.replication
                        .fast_drains
                        .insert(group, DrainRole::Target(copying));
                    return;
                }
                // What was not copied is written again from this image,
                // as deltas, so that the source's newer image of it is
                // replaced: the same gates hold until then.
                self.stats.fast_drain_regions_lost_total += copying.gated.len() as u64;
                let asked = std::mem::take(&mut copying.asked);
                copying
                    .lacking
                    .extend(asked.into_values().map(|(region, _)| region));
                copying.source = site;
                copying.paused_until = None;
                self.replication
                    .fast_drains
                    .insert(group, DrainRole::Target(copying));
                self.pump_fast_drain(group);
                return;
            } else {
                // Ownership moved on before the copy ended: resynced whole
                // from the new owner, as a replica mid-resync is.
                self.marks.hit(Mark::FastDrainAbandoned);
                self.replication.inbound.entry(group).or_default().resync = Some(InboundResync {
                    last_received: false,
                    consistent_at: DeltaSeq(0),
                    consistent_epoch: None,
                });
            }
        }
        self.save_resync_marks(None);
        self.resume_fast_drain_waiters(copying.waiting);
    }
}

impl Engine {
    /// Groups whose image here is incomplete because their drain, with
    /// this site as target, has regions left: kept durably marked.
    pub(super) fn fast_drain_targets(&self) -> Vec<GroupId> {
        self.replication
            .fast_drains
            .iter()
            .filter(
                |(_, role)| matches!(role, DrainRole::Target(copying) if !copying.gated.is_empty()),
            )
            .map(|(group, _)| *group)
            .collect()
    }

    /// Copies asked, being read, or in the cache until their delta is on
    /// the legs, over every drain here.
    fn fast_drain_copies_in_flight(&mut self) -> usize {
        let unapplied = &self.journal.unapplied;
        self.replication
            .fast_drains
            .values_mut()
            .map(|role| match role {
                DrainRole::Target(copying) => {
                    copying
                        .applying
                        .retain(|position| unapplied.contains(position));
                    copying.asked.len() + copying.reading.len() + copying.applying.len()
                }
                DrainRole::Source { .. } => 0,
            })
            .sum()
    }

    /// A leg write landed: copies it applied leave the window.
    pub(in crate::engine) fn pump_fast_drains(&mut self) {
        if self.replication.fast_drains.is_empty() {
            return;
        }
        let groups: Vec<GroupId> = self.replication.fast_drains.keys().copied().collect();
        for group in groups {
            self.pump_fast_drain(group);
        }
    }
}
