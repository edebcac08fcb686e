//! Live migrations (drain mode) under every fault the scenario draws, as
//! the node drives them (`crates/node/src/migration.rs`):
//!
//! 1. the authority records the move (`BeginMove`); writes go on at the
//!    source while the target catches up;
//! 2. once the target streams and lacks no more than the switch point
//!    ([`SwitchPoint::reached`], the rule the node uses), the source holds
//!    the group's writes and closes its open delta (`hand_over`);
//! 3. once the target applied every delta (`hand_over_ready`), the
//!    authority raises the epoch and names it owner (`TransferGroup` with
//!    `migration`), the target learns it, then the source and every other
//!    site (the held writes go to the target); if that takes longer than
//!    the hold bound, the switchover is called off and catching up goes on;
//! 4. a migration whose source restarted is cancelled (the node does it
//!    when it reconciles), one that did not switch over by its deadline
//!    gives up, and one whose group a failover took ends with it.
//!
//! The checker judges every switchover: the target's image must hold every
//! write the group acknowledged (G4: a planned move loses nothing), and a
//! held write's wait counts against the owner-stall bound (G5), which is
//! the pause bound.

use std::collections::VecDeque;

use stretch_control::SwitchPoint;
use stretch_core::BLOCK_SIZE;
use stretch_metadata::{Command, FastDrain, FastSeal};

use super::ownership::{group_name, site_index, site_name};
use super::*;

/// How often a migration's driver looks at the target's progress.
const STEP_MS: u64 = 10;
/// Longest the writes are held at a switchover before it is called off
/// (well inside the owner-stall bound: a held write is an owner write).
pub(super) const HOLD_MS_MAX: u64 = 200;
/// The target applies a switchover at most this long after its source, in
/// milliseconds (the metadata commit reaching it).
const TARGET_LEARNS_MS_MAX: u64 = 50;
/// A migration that has not switched over by then gives up.
/// Each migration's timeout is drawn between these, in milliseconds: short
/// ones give up under a backlog or a cut, so that path runs often too.
const TIMEOUT_MS_MIN: u64 = 300;
const TIMEOUT_MS_MAX: u64 = 3_000;
/// The drain rate is measured over this window.
const RATE_WINDOW_NS: u64 = 1_000 * MS;

/// One migration in flight.
pub(super) struct Migration {
    group: u32,
    from: usize,
    to: usize,
    /// The epoch the move was recorded at.
    epoch: u64,
    /// The source node's generation at the start: a restart ends it.
    generation: u64,
    deadline: u64,
    /// Writes held since then, for a switchover.
    holding_since: Option<u64>,
    /// (time, bytes the target applied) samples, for the drain rate.
    samples: VecDeque<(u64, u64)>,
    /// Fast mode: ownership moves as soon as the writes are held, and the
    /// target copies what it lacks afterwards (see `fast_drain_step`).
    fast: bool,
}

impl Simulation<'_> {
    /// Starts a migration of a group whose owner and another site are up,
    /// if one can start now; draws the next start.
    pub(super) fn migration_start(&mut self) {
        if self.workload_over {
            return;
        }
        self.schedule_migration_start();
        if self.site_loss.is_some() {
            return;
        }
        let groups = self.scenario.topology.groups;
        let group = self.migration_rng.between(1, groups as u64) as u32;
        if self.migrations.contains_key(&group) {
            return;
        }
        let from = self.control.owner(group);
        if self.control.isolated() == Some(from) || self.sites[from].node.is_none() {
            return;
        }
        let targets: Vec<usize> = (0..self.sites.len())
            .filter(|site| *site != from && self.sites[*site].node.is_some())
            .filter(|site| self.control.isolated() != Some(*site))
            .collect();
        if targets.is_empty() {
            return;
        }
        let to = targets[self.migration_rng.below(targets.len() as u64) as usize];
        let share = self.scenario.faults.fast_migration_share;
        // No draw without fast migrations: such runs stay as they were.
        let fast = share > 0.0 && self.migration_rng.chance(share);
        let Some(epoch) = self.control.begin_move(group, to) else {
            return;
        };
        self.stats.migrations_started += 1;
        self.trace.record(
            self.now,
            Some(from),
            &[60, group as u64, to as u64, fast as u64],
            || {
                let mode = if fast { "fast" } else { "drain" };
                format!(
                    "MIGRATION of group {group} to site {} begins ({mode} mode)",
                    to + 1
                )
            },
        );
        let step = self.scenario.engine.delta_interval_ms.max(1);
        let timeout_ms = self.migration_rng.between(TIMEOUT_MS_MIN, TIMEOUT_MS_MAX);
        self.migrations.insert(
            group,
            Migration {
                group,
                from,
                to,
                epoch,
                generation: self.sites[from].generation,
                deadline: self.now + timeout_ms * MS,
                holding_since: None,
                samples: VecDeque::new(),
                fast,
            },
        );
        self.schedule(self.now + step * MS, Event::MigrationStep(group));
    }

    /// Draws when the next migration starts.
    pub(super) fn schedule_migration_start(&mut self) {
        let rate = self.scenario.faults.migration_per_second;
        if rate <= 0.0 {
            return;
        }
        let at = self.now + exponential(&mut self.migration_rng, rate);
        self.schedule(at, Event::MigrationStart);
    }

    /// One look of a migration's driver.
    pub(super) fn migration_step(&mut self, group: u32) {
        let Some(mut migration) = self.migrations.remove(&group) else {
            return;
        };
        if let Some(ended) = self.migration_ended(&migration) {
            self.end_migration(&migration, ended);
            return;
        }
        let done = match migration.holding_since {
            None => self.catch_up(&mut migration),
            Some(since) => self.switch_over(&mut migration, since),
        };
        if done || self.violation.is_some() {
            return;
        }
        self.migrations.insert(group, migration);
        self.schedule(self.now + STEP_MS * MS, Event::MigrationStep(group));
    }

    /// Why the migration is over without switching over, if it is.
    fn migration_ended(&mut self, migration: &Migration) -> Option<&'static str> {
        if !self
            .control
            .move_in_flight(migration.group, migration.to, migration.epoch)
        {
            // A failover took the group (its source was cut off).
            return Some("its group was failed over");
        }
        if self.sites[migration.from].generation != migration.generation {
            // The source's node restarted: the held writes died with it,
            // and the node cancels a migration it no longer drives.
            self.control.abort_move(migration.group, migration.epoch);
            return Some("its source restarted");
        }
        if migration.holding_since.is_none() && self.now >= migration.deadline {
            self.control.abort_move(migration.group, migration.epoch);
            self.stats.migrations_gave_up += 1;
            return Some("it did not converge in time");
        }
        None
    }

    fn end_migration(&mut self, migration: &Migration, why: &'static str) {
        let (group, to) = (migration.group, migration.to);
        self.trace
            .record(self.now, Some(migration.from), &[61, group as u64], || {
                format!("MIGRATION of group {group} to site {} ends: {why}", to + 1)
            });
    }

    /// Catching up: holds the writes once the target is near enough.
    /// True when the migration is over.
    fn catch_up(&mut self, migration: &mut Migration) -> bool {
        let group = GroupId(migration.group);
        let target = SiteId(migration.to as u32 + 1);
        let now = self.site_now(migration.from);
        let Some(node) = self.sites[migration.from].node.as_mut() else {
            return false;
        };
        let status = node
            .engine
            .replication_status()
            .into_iter()
            .find(|status| status.group == group);
        let Some(peer) = status
            .as_ref()
            .and_then(|status| status.peers.iter().find(|peer| peer.peer == target))
        else {
            return false;
        };
        let region_bytes = self.scenario.engine.region_blocks * BLOCK_SIZE as u64;
        let bytes_left = peer.unapplied_bytes + peer.resync_regions_left * region_bytes;
        migration
            .samples
            .push_back((self.now, peer.applied_bytes_total));
        while migration
            .samples
            .front()
            .is_some_and(|(at, _)| self.now - at > RATE_WINDOW_NS)
        {
            migration.samples.pop_front();
        }
        let drain_rate = match (migration.samples.front(), migration.samples.back()) {
            (Some((first_at, first)), Some((last_at, last))) if last_at > first_at => {
                (last - first) * 1_000_000_000 / (last_at - first_at)
            }
            _ => 0,
        };
        let point = SwitchPoint {
            drain_ms: SwitchPoint::NODE.drain_ms,
            // One delta: the simulator's volumes are a few hundred KiB.
            bytes_min: self.scenario.engine.delta_max_bytes,
        };
        let streaming = peer.state == stretch_core::PeerState::Streaming;
        // Fast mode moves ownership at once; the target only has to stream
        // or be resynced (what it lacks is then known: the regions of the
        // deltas it has not applied and those its resync has not copied).
        let reached = if migration.fast {
            streaming || peer.state == stretch_core::PeerState::Resyncing
        } else {
            point.reached(streaming, bytes_left, drain_rate)
        };
        if !reached {
            return false;
        }
        if node.engine.hand_over(now, group).is_err() {
            return false;
        }
        migration.holding_since = Some(self.now);
        self.trace.record(
            self.now,
            Some(migration.from),
            &[62, migration.group as u64, bytes_left],
            || {
                format!(
                    "MIGRATION of group {} holds its writes ({bytes_left} bytes left at site {})",
                    migration.group,
                    migration.to + 1
                )
            },
        );
        self.dispatch(migration.from);
        false
    }

    /// Holding the writes: switches over once the target holds every
    /// delta, or calls it off past the hold bound. True when over.
    fn switch_over(&mut self, migration: &mut Migration, since: u64) -> bool {
        let group = GroupId(migration.group);
        let target = SiteId(migration.to as u32 + 1);
        let from = migration.from;
        // Cut off from the voters, the source cannot commit the switchover.
        let reaches_voters = self.control.isolated() != Some(from);
        let target_up = self.sites[migration.to].node.is_some()
            && self.control.isolated() != Some(migration.to);
        let now = self.site_now(from);
        let Some(node) = self.sites[from].node.as_mut() else {
            return false;
        };
        let early = self.options.bug == Some(SimBug::MigrationSwitchesEarly);
        let ready = if migration.fast {
            node.engine.fast_hand_over_ready(group, target)
        } else {
            early || node.engine.hand_over_ready(group, target)
        };
        if !(ready && reaches_voters && target_up) {
            if self.now - since > HOLD_MS_MAX * MS {
                node.engine.cancel_hand_over(now, group);
                migration.holding_since = None;
                self.stats.switchovers_called_off += 1;
                self.trace
                    .record(self.now, Some(from), &[63, migration.group as u64], || {
                        format!(
                            "MIGRATION of group {}: switchover called off after {HOLD_MS_MAX} ms",
                            migration.group
                        )
                    });
                self.dispatch(from);
            }
            return false;
        }
        if migration.fast {
            let Some(sealed) = node.engine.fast_seal(group, target) else {
                panic!("simulator invariant: a group ready for a fast switchover seals");
            };
            return self.fast_switch_over(migration, since, sealed.last.0, sealed.regions);
        }
        let last_seq = node
            .engine
            .replication_status()
            .into_iter()
            .find(|status| status.group == group)
            .map_or(0, |status| status.last_seq.0);
        let views = match self.image_of(migration.to, migration.group) {
            Ok(views) => views,
            Err(violation) => {
                self.fail(violation);
                return true;
            }
        };
        self.control.switch_over(migration, last_seq, None);
        if let Err(violation) = self
            .checker
            .after_handover(migration.group, migration.to, views)
        {
            self.fail(violation);
            return true;
        }
        let pause = self.now - since;
        self.stats.migrations += 1;
        self.stats.migration_pause_max_ns = self.stats.migration_pause_max_ns.max(pause);
        self.trace.record(
            self.now,
            Some(migration.to),
            &[64, migration.group as u64, last_seq],
            || {
                format!(
                    "MIGRATION of group {} switched over to site {} after delta {last_seq}; writes held {} ms",
                    migration.group,
                    migration.to + 1,
                    pause / MS
                )
            },
        );
        self.learn_switchover(from);
        true
    }

    /// As the node does: the source applies a switchover at once and sends
    /// the held writes on; the target and the other sites apply it up to
    /// TARGET_LEARNS_MS_MAX later, each in its own time (held writes and
    /// strict reads that reach the target before wait there for it; a
    /// third site meanwhile still takes the source for the owner, and may
    /// hold read leases the source granted). A site cut off from the
    /// voters learns when it returns.
    fn learn_switchover(&mut self, from: usize) {
        self.learn_now(from);
        for site in 0..self.sites.len() {
            if site != from && self.control.isolated() != Some(site) {
                let delay = self.migration_rng.below(TARGET_LEARNS_MS_MAX * MS + 1);
                self.schedule(self.now + delay, Event::MigrationTargetLearns(site));
            }
        }
    }

    /// A fast switchover: the target owns the group from the seal on and
    /// copies what it lacks. Judged once the copy ends (`fast_drain_step`):
    /// the target's image must then hold every write the group accepted.
    fn fast_switch_over(
        &mut self,
        migration: &Migration,
        since: u64,
        last_seq: u64,
        regions: Option<Vec<(VolumeId, u64)>>,
    ) -> bool {
        let count = regions
            .as_ref()
            .map_or(u64::MAX, |regions| regions.len() as u64);
        let regions = regions.map(|regions| {
            regions
                .into_iter()
                .map(|(volume, region)| (volume.0, region))
                .collect()
        });
        self.control.switch_over(migration, last_seq, Some(regions));
        self.checker.owner_moved(migration.group, migration.to);
        let pause = self.now - since;
        self.stats.migrations += 1;
        self.stats.fast_migrations += 1;
        self.stats.migration_pause_max_ns = self.stats.migration_pause_max_ns.max(pause);
        self.trace.record(
            self.now,
            Some(migration.to),
            &[65, migration.group as u64, last_seq, count],
            || {
                format!(
                    "MIGRATION of group {} switched over to site {} after delta {last_seq} (fast: {} regions to copy); writes held {} ms",
                    migration.group,
                    migration.to + 1,
                    if count == u64::MAX { "every".to_string() } else { count.to_string() },
                    pause / MS
                )
            },
        );
        self.learn_switchover(migration.from);
        self.schedule(
            self.now + STEP_MS * MS,
            Event::FastDrainStep(migration.group),
        );
        true
    }

    /// One look of a fast migration's driver at its target: once every
    /// region is copied it commits the drain's end, and the target's image
    /// is judged as a drain-mode switchover's is (G3, G4). A drain a
    /// failover ended (the record is gone) is over here.
    pub(super) fn fast_drain_step(&mut self, group: u32) {
        let Some(drain) = self.control.fast_drain(group) else {
            return;
        };
        let to = site_index(&drain.to);
        let reaches_voters = self.control.isolated() != Some(to);
        let done = self.sites[to].node.as_ref().is_some_and(|node| {
            node.engine
                .fast_drain_progress(GroupId(group))
                .is_some_and(|progress| progress.regions_left == 0)
        });
        if !(done && reaches_voters) {
            self.schedule(self.now + STEP_MS * MS, Event::FastDrainStep(group));
            return;
        }
        let views = match self.image_of(to, group) {
            Ok(views) => views,
            Err(violation) => {
                self.fail(violation);
                return;
            }
        };
        self.control.end_fast_drain(group, drain.epoch);
        if let Err(violation) = self.checker.after_handover(group, to, views) {
            self.fail(violation);
            return;
        }
        self.stats.fast_drains_done += 1;
        self.trace
            .record(self.now, Some(to), &[66, group as u64], || {
                format!(
                    "MIGRATION of group {group}: site {} copied every region it lacked",
                    to + 1
                )
            });
        self.learn_switchover(to);
    }
}

impl super::ownership::Control {
    /// Records a move of `group` to `to`; its epoch, or `None` if the
    /// authority refuses (the group is suspended or moving).
    pub(super) fn begin_move(&mut self, group: u32, to: usize) -> Option<u64> {
        let epoch = self.authority().groups[&group].epoch;
        let command = Command::BeginMove {
            group: group_name(group),
            to: site_name(to),
            expected_epoch: epoch,
        };
        self.apply_unversioned(&command).ok().map(|()| epoch)
    }

    /// Whether the move of `group` to `to` recorded at `epoch` is still in
    /// flight.
    pub(super) fn move_in_flight(&self, group: u32, to: usize, epoch: u64) -> bool {
        self.authority()
            .moves
            .get(&group)
            .is_some_and(|record| record.to == site_name(to) && record.epoch == epoch)
    }

    pub(super) fn abort_move(&mut self, group: u32, epoch: u64) {
        let command = Command::AbortMove {
            group: group_name(group),
            expected_epoch: epoch,
        };
        if let Err(error) = self.apply_unversioned(&command) {
            panic!("simulator invariant: a move in flight can be aborted ({command}): {error}");
        }
    }

    /// Commits the switchover: `to` owns the group at the next epoch,
    /// after `last_seq`; in fast mode (`fast_regions` set), copying the
    /// regions named (`None`: every one).
    fn switch_over(
        &mut self,
        migration: &Migration,
        last_seq: u64,
        fast_regions: Option<Option<Vec<(u32, u64)>>>,
    ) {
        let command = Command::TransferGroup {
            group: group_name(migration.group),
            from: site_name(migration.from),
            to: site_name(migration.to),
            expected_epoch: migration.epoch,
            after_seq: last_seq,
            migration: true,
            fast: fast_regions.map(|regions| FastSeal { regions }),
        };
        if let Err(error) = self.apply_ownership_change(&command, migration.to, migration.group) {
            panic!("simulator invariant: the switchover applies ({command}): {error}");
        }
    }

    /// The drain of `group`'s fast migration, if one runs.
    pub(super) fn fast_drain(&self, group: u32) -> Option<FastDrain> {
        self.authority().groups.get(&group)?.fast_drain.clone()
    }

    /// Commits the end of `group`'s drain (its target copied everything).
    fn end_fast_drain(&mut self, group: u32, epoch: u64) {
        let command = Command::EndFastDrain {
            group: group_name(group),
            expected_epoch: epoch,
            accept_loss: false,
        };
        if let Err(error) = self.apply_unversioned(&command) {
            panic!("simulator invariant: a running drain can end ({command}): {error}");
        }
    }
}
