//! Read leases: strict reads of regions the owner is not writing, served
//! by a site that does not own the group from its own image, without a
//! round trip to the owner (G2 intact: a strict read never returns data
//! older than a write acknowledged before it began).
//!
//! - A site that sends a strict read to the owner also asks for a lease on
//!   the read's regions (`LeaseRequest`), naming the newest delta of the
//!   group it holds. The owner grants it only if nothing it acknowledged or
//!   is writing touched those regions after that delta, the site receives
//!   its deltas (streaming), no write of its own waits on the regions and
//!   none revoked a lease on them in the last `read_lease_cooldown_ms`
//!   (a region the owner keeps writing is not leased again and again).
//! - Time runs on each site's own monotonic clock, never compared across
//!   sites. The holder counts a lease from when it *sent* the request and
//!   cuts it short by the drift bound: it serves locally while
//!   `now < sent + lease * (1 - drift)`. The owner counts it from when it
//!   granted it and stretches it: the lease may be held while
//!   `now < granted + lease * (1 + drift)`. The request left before the
//!   grant was made, so the holder's lease ends first in real time.
//! - While its lease on every region of a read is valid, and it is neither
//!   mid-resync nor holding deltas a failover discarded, a site serves the
//!   strict read from its own image. It holds every delta that wrote those
//!   regions: none was written after the delta it named, and any later
//!   write to them is preceded by a revocation.
//! - Before an owner's write (or zeroing) of a leased region starts, the
//!   owner revokes the lease (`LeaseRevoke`); the write waits until each
//!   holder confirmed (`LeaseRevoked`) or its lease ran out. Writes to
//!   regions no other site leases do not wait. A forwarded write waits at
//!   most half the remote timeout (its site gives up on it after that).
//!   A write that was waiting on a revocation when a hand-over of its
//!   group began is accepted once the revocation is confirmed (it came
//!   before the hand-over, so it is not held): the hand-over is not ready
//!   while such a write waits, and then waits for its delta to reach the
//!   target like any other.
//! - A holder drops a revoked lease at once, and voids the grants still on
//!   their way for requests it sent before the revocation (a grant made
//!   before the revocation may arrive after it).
//! - An owner that does not know which leases other sites hold (it
//!   restarted, or it just became the owner) takes every region of the
//!   group as leased by every other site but the previous owner, for one
//!   stretched lease period from the first moment its clock is known, and
//!   revokes them all at once: its writes wait one round trip, or the
//!   period when a site does not answer. It grants nothing meanwhile.
//! - A holder drops its leases on a group whose owner changes, and all of
//!   them when it restarts (they live in memory only).
//! - A holder renews, past half their period, the leases on regions it
//!   read in the last [`READ_LEASE_IDLE_PERIODS_MAX`] periods, so that a
//!   working set read now and then (a file system checked again) stays
//!   leased; leases on regions it stopped reading run out.

use super::*;

use crate::site_message::LEASE_REGIONS_MAX;

/// A region of a volume: (volume, first block / region blocks).
type Region = (VolumeId, u64);

/// A holder keeps renewing a lease on a region it read within this many
/// lease periods (a minute at the default 2 s); past it the lease runs out.
pub const READ_LEASE_IDLE_PERIODS_MAX: u64 = 30;

/// Per-volume read-lease figures, for metrics and `volume show`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadLeaseCounters {
    /// Strict reads this site served from its own image under a lease.
    pub local_strict_reads_total: u64,
    /// Strict reads this site sent to the owner.
    pub remote_strict_reads_total: u64,
    /// Leases this site (as owner) revoked before a write.
    pub revocations_total: u64,
    /// Writes this site (as owner) held until a revocation was confirmed
    /// or a lease ran out, and how long they waited altogether.
    pub writes_waited_total: u64,
    pub write_wait_nanos_total: u64,
}

#[derive(Debug, Default)]
pub(super) struct ReadLeases {
    // Owner side.
    /// Per region: until when (this site's clock) each other site may
    /// still hold a lease on it.
    granted: BTreeMap<Region, BTreeMap<SiteId, Timestamp>>,
    /// Entries of `granted`, for the `read_leases_max` bound (recounted
    /// whenever the bound is reached, so a drift here only moves when the
    /// recount happens).
    granted_count: usize,
    /// Regions not leased again before then: a write revoked them.
    cooldown: BTreeMap<Region, Timestamp>,
    /// Groups owned here whose leases held elsewhere are unknown: per
    /// site, until when it may hold any lease on them (`None`: one period
    /// from the first moment the engine learns the time).
    unknown: BTreeMap<GroupId, BTreeMap<SiteId, Option<Timestamp>>>,
    /// Groups owned here since this run knows every lease it granted.
    known: BTreeSet<GroupId>,
    revoking: BTreeMap<u64, Revocation>,
    next_revocation: u64,
    /// Writes waiting for revocations, oldest first.
    waiting: VecDeque<WaitingWrite>,
    /// When the first waiting write may be free (a lease ends) or must be
    /// refused (its deadline).
    wake_at: Option<Timestamp>,
    /// Writes past the gate not answered yet, with their regions, and how
    /// many per region: a region being written is not leased.
    writing: BTreeMap<RequestId, Vec<Region>>,
    writing_regions: BTreeMap<Region, u32>,
    // Holder side.
    held: BTreeMap<Region, HeldLease>,
    /// When the holder next renews the leases past half their period.
    renew_at: Option<Timestamp>,
    asking: BTreeMap<u64, Asking>,
    asking_regions: BTreeSet<Region>,
    counters: BTreeMap<VolumeId, ReadLeaseCounters>,
}

#[derive(Debug)]
struct Revocation {
    peer: SiteId,
    group: GroupId,
    regions: Vec<Region>,
    all: bool,
    /// Past this the leases it revokes ran out anyway.
    until: Timestamp,
}

#[derive(Debug)]
struct WaitingWrite {
    request: RequestId,
    body: Request,
    group: GroupId,
    regions: Vec<Region>,
    since: Timestamp,
    /// A forwarded write is refused past it.
    deadline: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy)]
struct HeldLease {
    group: GroupId,
    until: Timestamp,
    renew_after: Timestamp,
    /// The last strict read served under it (or its first grant).
    last_used: Timestamp,
}

#[derive(Debug)]
struct Asking {
    group: GroupId,
    regions: Vec<Region>,
    sent_at: Timestamp,
    /// When the regions were last read here: the granted lease is renewed
    /// for as long as that is recent (a renewal must not make it newer).
    used_at: Timestamp,
    /// A revocation came while it was on its way: its grant is void.
    void: bool,
}

/// Blocks of every region a byte range touches, as regions.
fn regions_of_range(volume: VolumeId, offset: u64, length: u64, region_blocks: u64) -> Vec<Region> {
    if length == 0 {
        return Vec::new();
    }
    let span = block_span(offset, length);
    let first = span.start() / region_blocks;
    let last = span.end() / region_blocks;
    (first..=last).map(|region| (volume, region)).collect()
}

/// `duration_ms` scaled by `(1_000_000 + delta_ppm) / 1_000_000`.
fn scaled(duration_ms: u64, drift_ppm: u64, longer: bool) -> u64 {
    let nanos = u128::from(duration_ms) * 1_000_000;
    let ppm = u128::from(drift_ppm.min(999_999));
    let factor = if longer {
        1_000_000 + ppm
    } else {
        1_000_000 - ppm
    };
    u64::try_from(nanos * factor / 1_000_000).unwrap_or(u64::MAX)
}

impl ReadLeases {
    pub(super) fn next_deadline(&self) -> Option<Timestamp> {
        match (self.wake_at, self.renew_at) {
            (Some(wake), Some(renew)) => Some(wake.min(renew)),
            (wake, renew) => wake.or(renew),
        }
    }

    pub(super) fn is_idle(&self) -> bool {
        self.waiting.is_empty()
    }

    pub(super) fn holds_writes_of(&self, group: GroupId) -> bool {
        self.waiting.iter().any(|write| write.group == group)
    }

    /// The engine learned the time: leases unknown since the start last
    /// one stretched period from now.
    pub(super) fn clock_known(&mut self, now: Timestamp, stretched_nanos: u64) {
        for sites in self.unknown.values_mut() {
            for until in sites.values_mut() {
                if until.is_none() {
                    *until = Some(Timestamp(now.0.saturating_add(stretched_nanos)));
                }
            }
        }
    }

    /// A write (or another request) was answered.
    pub(super) fn finish_write(&mut self, request: RequestId) {
        let Some(regions) = self.writing.remove(&request) else {
            return;
        };
        for region in regions {
            if let Some(count) = self.writing_regions.get_mut(&region) {
                *count -= 1;
                if *count == 0 {
                    self.writing_regions.remove(&region);
                }
            }
        }
    }

    fn start_write(&mut self, request: RequestId, regions: Vec<Region>) {
        for region in &regions {
            *self.writing_regions.entry(*region).or_default() += 1;
        }
        self.writing.insert(request, regions);
    }

    fn counters(&mut self, volume: VolumeId) -> &mut ReadLeaseCounters {
        self.counters.entry(volume).or_default()
    }

    /// The sites that may hold a lease on any of `regions` of `group` now,
    /// each with the regions (`None`: all of the group) and until when.
    /// Entries that ran out are dropped on the way.
    fn blockers(
        &mut self,
        now: Timestamp,
        group: GroupId,
        regions: &[Region],
    ) -> Vec<(SiteId, Option<Region>, Timestamp)> {
        let mut blockers = Vec::new();
        if let Some(sites) = self.unknown.get_mut(&group) {
            sites.retain(|_, until| until.is_none_or(|until| until > now));
            for (site, until) in sites.iter() {
                // Unknown time: the engine saw no clock yet; it will.
                let until = until.unwrap_or(Timestamp(u64::MAX));
                blockers.push((*site, None, until));
            }
            if sites.is_empty() {
                self.unknown.remove(&group);
            }
        }
        for region in regions {
            let Some(sites) = self.granted.get_mut(region) else {
                continue;
            };
            let before = sites.len();
            sites.retain(|_, until| *until > now);
            self.granted_count -= before - sites.len();
            for (site, until) in sites.iter() {
                blockers.push((*site, Some(*region), *until));
            }
            if sites.is_empty() {
                self.granted.remove(region);
            }
        }
        blockers
    }

    fn prune_granted(&mut self, now: Timestamp) {
        self.granted.retain(|_, sites| {
            sites.retain(|_, until| *until > now);
            !sites.is_empty()
        });
        self.granted_count = self.granted.values().map(BTreeMap::len).sum();
        self.cooldown.retain(|_, until| *until > now);
    }

    /// Drops the leases this site holds on `group` (every one, or those on
    /// `regions`), and voids the grants on their way to it.
    fn drop_held(&mut self, group: GroupId, regions: Option<&[Region]>) {
        match regions {
            None => self.held.retain(|_, lease| lease.group != group),
            Some(regions) => {
                for region in regions {
                    self.held.remove(region);
                }
            }
        }
        for asking in self.asking.values_mut() {
            if asking.group == group {
                asking.void = true;
            }
        }
    }
}

impl Engine {
    /// Read-lease figures of `volume` at this site.
    pub fn read_lease_counters(&self, volume: VolumeId) -> ReadLeaseCounters {
        self.read_leases
            .counters
            .get(&volume)
            .copied()
            .unwrap_or_default()
    }

    fn read_leases_on(&self) -> bool {
        self.config.read_lease_ms > 0 && !self.config.peers.is_empty()
    }

    /// One lease period as the owner must count it (stretched by drift).
    pub(super) fn stretched_lease_nanos(&self) -> u64 {
        scaled(self.config.read_lease_ms, self.config.clock_drift_ppm, true)
    }

    fn regions_of_range(&self, volume: VolumeId, offset: u64, length: u64) -> Vec<Region> {
        regions_of_range(volume, offset, length, self.config.region_blocks)
    }

    // -----------------------------------------------------------------
    // Holder side

    /// At a site that does not own `spec`'s group, for a strict read
    /// already checked against the volume's size: serves it from this
    /// site's image if a valid lease covers it (true), asking for a new
    /// lease past half of it. False: the read goes to the owner.
    pub(super) fn serve_under_read_lease(
        &mut self,
        request_id: RequestId,
        spec: &VolumeSpec,
        volume: VolumeId,
        offset: u64,
        length: u64,
    ) -> bool {
        if !self.read_leases_on()
            || length == 0
            || self.mid_resync_here(spec.group)
            || self.diverged_here(spec.group)
        {
            return false;
        }
        let regions = self.regions_of_range(volume, offset, length);
        let now = self.now;
        let never_expires = self.config.planted_bug == Some(PlantedBug::ReadLeaseNeverExpires);
        for region in &regions {
            let Some(lease) = self.read_leases.held.get(region) else {
                return false;
            };
            if lease.group != spec.group || (lease.until <= now && !never_expires) {
                return false;
            }
        }
        for region in &regions {
            if let Some(lease) = self.read_leases.held.get_mut(region) {
                lease.last_used = now;
            }
        }
        self.marks.hit(Mark::ReadLeaseServedLocally);
        self.read_leases.counters(volume).local_strict_reads_total += 1;
        self.start_read(request_id, volume, offset, length, None);
        true
    }

    /// Asks the owner of `group` for a lease on the regions of a range
    /// (unless one of them is being asked for already). Only a site at a
    /// delta boundary of the owner's line asks.
    pub(super) fn ask_read_lease(
        &mut self,
        group: GroupId,
        volume: VolumeId,
        offset: u64,
        length: u64,
    ) {
        if !self.read_leases_on() || self.mid_resync_here(group) || self.diverged_here(group) {
            return;
        }
        let regions = self.regions_of_range(volume, offset, length);
        let now = self.now;
        self.ask_for_regions(group, regions, now);
    }

    /// Asks the owner of `group` for a lease on `regions` (one volume's,
    /// consecutive), unless one of them is being asked for already.
    fn ask_for_regions(&mut self, group: GroupId, regions: Vec<Region>, used_at: Timestamp) {
        if regions.is_empty()
            || regions.len() > LEASE_REGIONS_MAX
            || regions
                .iter()
                .any(|region| self.read_leases.asking_regions.contains(region))
        {
            return;
        }
        let volume = regions[0].0;
        let now = self.now;
        // Requests whose grant would have run out by now are forgotten:
        // the answer of a gone owner never comes.
        let horizon = self.config.read_lease_ms;
        while let Some((id, asking)) = self.read_leases.asking.first_key_value() {
            if asking.sent_at.saturating_add_millis(horizon) > now {
                break;
            }
            let id = *id;
            let asking = self
                .read_leases
                .asking
                .remove(&id)
                .expect("engine invariant: first entry exists");
            for region in asking.regions {
                self.read_leases.asking_regions.remove(&region);
            }
        }
        // A renewal names regions held already: only the others are more.
        let more = |held: &BTreeMap<Region, HeldLease>| {
            held.len()
                + regions
                    .iter()
                    .filter(|region| !held.contains_key(region))
                    .count()
        };
        if more(&self.read_leases.held) > self.config.read_leases_max {
            self.read_leases.held.retain(|_, lease| lease.until > now);
            if more(&self.read_leases.held) > self.config.read_leases_max {
                self.marks.hit(Mark::ReadLeaseBoundReached);
                return;
            }
        }
        let have = DeltaSeq(self.groups[&group].next_seq.0 - 1);
        let id = self.replication.next_remote;
        self.replication.next_remote += 1;
        let first_region = regions[0].1;
        let count = regions.len() as u64;
        self.read_leases
            .asking_regions
            .extend(regions.iter().copied());
        self.read_leases.asking.insert(
            id,
            Asking {
                group,
                regions,
                sent_at: now,
                used_at,
                void: false,
            },
        );
        let owner = self.owner_of(group);
        self.actions.push_back(Action::Send {
            peer: owner,
            message: SiteMessage::LeaseRequest {
                id,
                volume,
                first_region,
                regions: count,
                have,
            },
        });
    }

    pub(super) fn count_remote_strict_read(&mut self, volume: VolumeId) {
        self.read_leases.counters(volume).remote_strict_reads_total += 1;
    }

    pub(super) fn receive_lease_reply(&mut self, from: SiteId, id: u64, lease_ms: u64) {
        let Some(asking) = self.read_leases.asking.remove(&id) else {
            // Forgotten (too old to be of use), or never asked.
            return;
        };
        for region in &asking.regions {
            self.read_leases.asking_regions.remove(region);
        }
        if lease_ms == 0 || asking.void || self.owner_of(asking.group) != from {
            return;
        }
        // A lease longer than this site would grant is taken as that long.
        let lease_ms = lease_ms.min(self.config.read_lease_ms);
        let lasting = scaled(lease_ms, self.config.clock_drift_ppm, false);
        let until = Timestamp(asking.sent_at.0.saturating_add(lasting));
        if until <= self.now {
            return;
        }
        let renew_after = Timestamp(asking.sent_at.0.saturating_add(lasting / 2));
        self.marks.hit(Mark::ReadLeaseGranted);
        for region in asking.regions {
            let lease = HeldLease {
                group: asking.group,
                until,
                renew_after,
                last_used: asking.used_at,
            };
            self.read_leases
                .held
                .entry(region)
                .and_modify(|held| {
                    held.last_used = held.last_used.max(asking.used_at);
                    if held.until < until {
                        held.until = until;
                        held.renew_after = renew_after;
                    }
                })
                .or_insert(lease);
        }
        let renew_at = self
            .read_leases
            .renew_at
            .map_or(renew_after, |at| at.min(renew_after));
        self.read_leases.renew_at = Some(renew_at);
    }

    /// The holder's renewal round: leases past half their period on
    /// regions read lately are asked for again, in runs of consecutive
    /// regions; leases that ran out are dropped.
    fn renew_read_leases(&mut self) {
        let now = self.now;
        let idle_max = self
            .config
            .read_lease_ms
            .saturating_mul(READ_LEASE_IDLE_PERIODS_MAX);
        if self.config.planted_bug != Some(PlantedBug::ReadLeaseNeverExpires) {
            self.read_leases.held.retain(|_, lease| lease.until > now);
        }
        let mut runs: Vec<(GroupId, Vec<Region>, Timestamp)> = Vec::new();
        let mut next: Option<Timestamp> = None;
        for (region, lease) in &self.read_leases.held {
            if lease.renew_after > now {
                next = Some(next.map_or(lease.renew_after, |at| at.min(lease.renew_after)));
                continue;
            }
            if lease.last_used.saturating_add_millis(idle_max) <= now {
                continue;
            }
            match runs.last_mut() {
                Some((group, run, used_at))
                    if *group == lease.group
                        && run.len() < LEASE_REGIONS_MAX
                        && run
                            .last()
                            .is_some_and(|last| last.0 == region.0 && last.1 + 1 == region.1) =>
                {
                    run.push(*region);
                    *used_at = (*used_at).max(lease.last_used);
                }
                _ => runs.push((lease.group, vec![*region], lease.last_used)),
            }
        }
        let asked = !runs.is_empty();
        for (group, regions, used_at) in runs {
            if self.owner_of(group) == self.config.site
                || self.mid_resync_here(group)
                || self.diverged_here(group)
            {
                continue;
            }
            self.marks.hit(Mark::ReadLeaseRenewed);
            self.ask_for_regions(group, regions, used_at);
        }
        // Renewals on their way: look again a quarter period later.
        if asked {
            let again = now.saturating_add_millis((self.config.read_lease_ms / 4).max(1));
            next = Some(next.map_or(again, |at| at.min(again)));
        }
        self.read_leases.renew_at = next;
    }

    pub(super) fn receive_lease_revoke(
        &mut self,
        from: SiteId,
        id: u64,
        group: GroupId,
        regions: Vec<Region>,
        all: bool,
    ) {
        // Dropping a lease is always safe: whoever asks is answered.
        if all {
            let now = self.now;
            let running = self
                .read_leases
                .held
                .values()
                .any(|lease| lease.group == group && lease.until > now);
            if running {
                self.marks.hit(Mark::ReadLeaseUnknownRevoked);
            }
            self.read_leases.drop_held(group, None);
        } else {
            self.read_leases.drop_held(group, Some(&regions));
        }
        self.actions.push_back(Action::Send {
            peer: from,
            message: SiteMessage::LeaseRevoked { id },
        });
    }

    // -----------------------------------------------------------------
    // Owner side

    pub(super) fn receive_lease_request(
        &mut self,
        from: SiteId,
        id: u64,
        volume: VolumeId,
        first_region: u64,
        regions: u64,
        have: DeltaSeq,
    ) {
        let granted = self.grant_read_lease(from, volume, first_region, regions, have);
        let lease_ms = if granted {
            self.config.read_lease_ms
        } else {
            0
        };
        self.actions.push_back(Action::Send {
            peer: from,
            message: SiteMessage::LeaseReply { id, lease_ms },
        });
    }

    fn grant_read_lease(
        &mut self,
        from: SiteId,
        volume: VolumeId,
        first_region: u64,
        count: u64,
        have: DeltaSeq,
    ) -> bool {
        if !self.read_leases_on() || from == self.config.site {
            return false;
        }
        let Some(spec) = self.volume(volume) else {
            return false;
        };
        if self.fast_drain_copying(spec.group) {
            // Which regions the sealed epoch's tail wrote is not known
            // here until the drain ends.
            return false;
        }
        let group = spec.group;
        let region_bytes = self.config.region_blocks * BLOCK_SIZE as u64;
        let volume_regions = spec.size.div_ceil(region_bytes);
        let in_range = first_region
            .checked_add(count)
            .is_some_and(|end| end <= volume_regions);
        if count == 0 || count > LEASE_REGIONS_MAX as u64 || !in_range {
            self.stats.refused_messages_total += 1;
            return false;
        }
        if self.owner_of(group) != self.config.site
            || !self.lease_valid()
            || self.replication.is_handing_over(group)
        {
            return false;
        }
        self.learn_lease_knowledge(group, None);
        let now = self.now;
        // Leases granted before this site knew them all may still be held.
        if !self.read_leases.blockers(now, group, &[]).is_empty() {
            return false;
        }
        if !self.streams_from(group, from, have) {
            return false;
        }
        let regions: Vec<Region> = (first_region..first_region + count)
            .map(|region| (volume, region))
            .collect();
        // A renewal names regions granted to `from` already: only the
        // others are more.
        let more = |leases: &ReadLeases| {
            leases.granted_count
                + regions
                    .iter()
                    .filter(|region| {
                        !leases
                            .granted
                            .get(region)
                            .is_some_and(|sites| sites.contains_key(&from))
                    })
                    .count()
        };
        if more(&self.read_leases) > self.config.read_leases_max {
            self.read_leases.prune_granted(now);
            if more(&self.read_leases) > self.config.read_leases_max {
                self.marks.hit(Mark::ReadLeaseBoundReached);
                return false;
            }
        }
        let region_blocks = self.config.region_blocks;
        for region in &regions {
            let cooling = self
                .read_leases
                .cooldown
                .get(region)
                .is_some_and(|until| *until > now);
            let waited_on = self
                .read_leases
                .waiting
                .iter()
                .any(|write| write.regions.contains(region));
            if cooling || waited_on || self.read_leases.writing_regions.contains_key(region) {
                return false;
            }
            let first = BlockKey {
                volume,
                block: region.1 * region_blocks,
            };
            let end = BlockKey {
                volume,
                block: (region.1 + 1) * region_blocks,
            };
            let newer_in_cache = self
                .index
                .range(first, end)
                .any(|(_, entry)| entry.dirty_seq.is_some_and(|seq| seq > have));
            if newer_in_cache || self.retained_wrote_after(group, first, end, have) {
                return false;
            }
        }
        let until = Timestamp(now.0.saturating_add(self.stretched_lease_nanos()));
        for region in regions {
            let sites = self.read_leases.granted.entry(region).or_default();
            match sites.get_mut(&from) {
                Some(held_until) => *held_until = (*held_until).max(until),
                None => {
                    sites.insert(from, until);
                    self.read_leases.granted_count += 1;
                }
            }
        }
        true
    }

    /// This site owns `group`: unless it knows every lease granted on it
    /// (it has owned it since this run granted them), every other site
    /// but `previous_owner` may hold any lease on it for one period. They
    /// are all revoked at once.
    pub(super) fn learn_lease_knowledge(&mut self, group: GroupId, previous_owner: Option<SiteId>) {
        if !self.read_leases_on() || !self.read_leases.known.insert(group) {
            return;
        }
        if self.config.planted_bug == Some(PlantedBug::ReadLeaseForgottenOnRestart) {
            return;
        }
        let until = self
            .clock_seen
            .then(|| Timestamp(self.now.0.saturating_add(self.stretched_lease_nanos())));
        let sites: Vec<SiteId> = self
            .config
            .peers
            .iter()
            .copied()
            .filter(|peer| Some(*peer) != previous_owner)
            .collect();
        if sites.is_empty() {
            return;
        }
        let unknown = self.read_leases.unknown.entry(group).or_default();
        for site in &sites {
            unknown.insert(*site, until);
        }
        for site in sites {
            self.send_revocation(
                site,
                group,
                Vec::new(),
                true,
                until.unwrap_or(Timestamp(u64::MAX)),
            );
        }
    }

    /// This site no longer owns `group`: what it knew of leases on it is
    /// the new owner's to learn again. Its writes waiting here go to the
    /// new owner at the next [`Engine::release_lease_waiters`].
    pub(super) fn forget_lease_knowledge(&mut self, group: GroupId) {
        self.read_leases.known.remove(&group);
        self.read_leases.unknown.remove(&group);
        let volumes = self.volumes_of(group);
        self.read_leases
            .granted
            .retain(|region, _| !volumes.contains(&region.0));
        self.read_leases.granted_count = self.read_leases.granted.values().map(BTreeMap::len).sum();
        self.read_leases
            .revoking
            .retain(|_, revocation| revocation.group != group);
    }

    /// Drops the leases this site holds on `group` (its owner changed).
    pub(super) fn drop_held_read_leases(&mut self, group: GroupId) {
        self.read_leases.drop_held(group, None);
    }

    fn send_revocation(
        &mut self,
        peer: SiteId,
        group: GroupId,
        regions: Vec<Region>,
        all: bool,
        until: Timestamp,
    ) {
        let id = self.read_leases.next_revocation;
        self.read_leases.next_revocation += 1;
        self.actions.push_back(Action::Send {
            peer,
            message: SiteMessage::LeaseRevoke {
                id,
                group,
                regions: regions.clone(),
                all,
            },
        });
        self.read_leases.revoking.insert(
            id,
            Revocation {
                peer,
                group,
                regions,
                all,
                until,
            },
        );
    }

    /// A connection to `peer` came up: revocations it may not have seen
    /// are sent again (it answers each; a repeated answer is ignored).
    pub(super) fn resend_revocations(&mut self, peer: SiteId) {
        let now = self.now;
        self.read_leases
            .revoking
            .retain(|_, revocation| revocation.until > now);
        let again: Vec<SiteMessage> = self
            .read_leases
            .revoking
            .iter()
            .filter(|(_, revocation)| revocation.peer == peer)
            .map(|(id, revocation)| SiteMessage::LeaseRevoke {
                id: *id,
                group: revocation.group,
                regions: revocation.regions.clone(),
                all: revocation.all,
            })
            .collect();
        for message in again {
            self.actions.push_back(Action::Send { peer, message });
        }
    }

    pub(super) fn receive_lease_revoked(&mut self, from: SiteId, id: u64) {
        let Some(revocation) = self.read_leases.revoking.get(&id) else {
            // Answered already (sent again after a reconnect).
            return;
        };
        if revocation.peer != from {
            self.stats.refused_messages_total += 1;
            return;
        }
        let revocation = self
            .read_leases
            .revoking
            .remove(&id)
            .expect("engine invariant: looked up above");
        self.marks.hit(Mark::ReadLeaseRevoked);
        if revocation.all
            && let Some(sites) = self.read_leases.unknown.get_mut(&revocation.group)
        {
            sites.remove(&from);
            if sites.is_empty() {
                self.read_leases.unknown.remove(&revocation.group);
            }
        }
        for region in &revocation.regions {
            if let Some(sites) = self.read_leases.granted.get_mut(region)
                && sites.remove(&from).is_some()
            {
                self.read_leases.granted_count -= 1;
                if sites.is_empty() {
                    self.read_leases.granted.remove(region);
                }
            }
        }
        self.release_lease_waiters();
    }

    /// Called for a write or zeroing of a group this site owns, before it
    /// starts: gives it back if no other site may hold a lease on its
    /// regions (recording it as being written), or holds it and revokes
    /// the leases in its way.
    pub(super) fn gate_on_read_leases(
        &mut self,
        request_id: RequestId,
        request: Request,
        group: GroupId,
    ) -> Option<Request> {
        let (volume, offset, length) = match &request {
            Request::Write {
                volume,
                offset,
                data,
                ..
            } => (*volume, *offset, data.len() as u64),
            Request::WriteZeroes {
                volume,
                offset,
                length,
                ..
            } => (*volume, *offset, *length),
            _ => return Some(request),
        };
        if !self.read_leases_on() {
            return Some(request);
        }
        self.learn_lease_knowledge(group, None);
        let regions = self.regions_of_range(volume, offset, length);
        let now = self.now;
        let blockers = self.read_leases.blockers(now, group, &regions);
        if blockers.is_empty() {
            self.read_leases.start_write(request_id, regions);
            return Some(request);
        }
        self.revoke_in_the_way(group, &regions, &blockers);
        if self.config.planted_bug == Some(PlantedBug::ReadLeaseWriteBeforeRevoked) {
            self.read_leases.start_write(request_id, regions);
            return Some(request);
        }
        if self.read_leases.waiting.len() >= self.config.suspended_requests_max {
            let error = RequestError::Io(format!(
                "{} writes already wait for read leases to be revoked",
                self.read_leases.waiting.len()
            ));
            self.reply(request_id, Err(error));
            return None;
        }
        // Another site's write is not held past the time its site waits
        // for it (see `gate_on_lease`).
        let deadline = self
            .is_forwarded(request_id)
            .then(|| now.saturating_add_millis(self.config.remote_timeout_ms / 2));
        self.read_leases.counters(volume).writes_waited_total += 1;
        self.read_leases.waiting.push_back(WaitingWrite {
            request: request_id,
            body: request,
            group,
            regions,
            since: now,
            deadline,
        });
        self.update_lease_wake();
        None
    }

    /// Sends the revocations a write to `regions` needs (those not on
    /// their way already) and keeps the regions from being leased again
    /// for a while.
    fn revoke_in_the_way(
        &mut self,
        group: GroupId,
        regions: &[Region],
        blockers: &[(SiteId, Option<Region>, Timestamp)],
    ) {
        let now = self.now;
        let cooldown_until = now.saturating_add_millis(self.config.read_lease_cooldown_ms);
        for region in regions {
            self.read_leases.cooldown.insert(*region, cooldown_until);
        }
        let mut per_site: BTreeMap<SiteId, (Vec<Region>, Timestamp)> = BTreeMap::new();
        for (site, region, until) in blockers {
            let Some(region) = region else {
                // Revoked as a whole when the ownership began.
                continue;
            };
            let on_its_way =
                self.read_leases.revoking.values().any(|revocation| {
                    revocation.peer == *site && revocation.regions.contains(region)
                });
            if on_its_way {
                continue;
            }
            let entry = per_site.entry(*site).or_insert((Vec::new(), *until));
            entry.0.push(*region);
            entry.1 = entry.1.max(*until);
        }
        for (site, (regions, until)) in per_site {
            if let Some(volume) = regions.first().map(|region| region.0) {
                self.read_leases.counters(volume).revocations_total += 1;
            }
            self.send_revocation(site, group, regions, false, until);
        }
    }

    /// Starts, in order, the waiting writes no lease stands in the way of
    /// any more; refuses forwarded ones past their deadline.
    pub(super) fn release_lease_waiters(&mut self) {
        let now = self.now;
        let waiting = std::mem::take(&mut self.read_leases.waiting);
        let mut ready = Vec::new();
        for write in waiting {
            if self.owner_of(write.group) != self.config.site {
                ready.push((write, false));
                continue;
            }
            let blockers = self.read_leases.blockers(now, write.group, &write.regions);
            if blockers.is_empty() {
                ready.push((write, true));
                continue;
            }
            if write.deadline.is_some_and(|deadline| deadline <= now) {
                let error = RequestError::Io(
                    "a forwarded write waited too long for read leases to be revoked".into(),
                );
                self.reply(write.request, Err(error));
                continue;
            }
            self.read_leases.waiting.push_back(write);
        }
        self.update_lease_wake();
        for (write, here) in ready {
            let waited = now.0.saturating_sub(write.since.0);
            let volume = write.body.volume();
            self.read_leases.counters(volume).write_wait_nanos_total += waited;
            if !here {
                // Ownership moved meanwhile: the whole gate again.
                self.submit(now, write.request, write.body);
                continue;
            }
            let unconfirmed = self.read_leases.revoking.values().any(|revocation| {
                revocation.group == write.group
                    && (revocation.all
                        || revocation.regions.iter().any(|r| write.regions.contains(r)))
            });
            if unconfirmed {
                self.marks.hit(Mark::ReadLeaseRanOut);
            }
            let Some(spec) = self.volume(volume) else {
                self.reply(write.request, Err(RequestError::NoVolume(volume)));
                continue;
            };
            self.read_leases.start_write(write.request, write.regions);
            self.start_request(write.request, write.body, spec);
        }
    }

    /// When the first waiting write may go: the earliest end of a lease in
    /// the way of a waiting write, or a forwarded write's deadline.
    fn update_lease_wake(&mut self) {
        let now = self.now;
        let mut wake: Option<Timestamp> = None;
        let mut earliest = |at: Timestamp| {
            wake = Some(wake.map_or(at, |wake| wake.min(at)));
        };
        for write in &self.read_leases.waiting {
            if let Some(deadline) = write.deadline {
                earliest(deadline);
            }
            if let Some(sites) = self.read_leases.unknown.get(&write.group) {
                for until in sites.values().flatten() {
                    earliest(*until);
                }
            }
            for region in &write.regions {
                if let Some(sites) = self.read_leases.granted.get(region) {
                    for until in sites.values() {
                        earliest(*until);
                    }
                }
            }
        }
        self.read_leases.wake_at = wake.map(|wake| wake.max(now));
    }

    pub(super) fn handle_read_lease_timeout(&mut self, now: Timestamp) {
        if self.read_leases.wake_at.is_some_and(|wake| wake <= now) {
            self.release_lease_waiters();
        }
        if self.read_leases.renew_at.is_some_and(|renew| renew <= now) {
            self.renew_read_leases();
        }
    }
}
